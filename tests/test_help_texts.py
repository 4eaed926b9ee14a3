"""``--help`` says what a user needs (issue 30): generate's sampling options have a description
and their default, bench describes every benchmark and how long it takes, train lists the config
keys (from the config dataclasses, so a new key shows up by itself)."""
import dataclasses
import re
import typing

import pytest


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def _option_help(text: str, option: str) -> str:
    """The help of ``option`` (its line and continuation lines) in argparse output."""
    m = re.search(rf"^  {re.escape(option)}\b.*?(?=^  -|\Z)", text, re.M | re.S)
    assert m, f"{option} not in help"
    return " ".join(m.group().split())


def test_generate_help_describes_sampling_options_and_defaults(capsys):
    from medjax.generate.__main__ import build_parser
    text = build_parser().format_help()
    for option, default in (("--max-new-tokens", "256"), ("--seed", "0"), ("--dtype", "float32")):
        line = _option_help(text, option)
        assert f"default: {default}" in line, line
        assert len(line.split()) > 6, line                   # more than the metavar and default


def test_bench_help_describes_every_benchmark(capsys):
    from medjax.bench.__main__ import BENCHMARKS, available, main
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert set(available()) == set(BENCHMARKS), "describe each medjax/bench module in BENCHMARKS"
    for name in available():
        what, how_long = BENCHMARKS[name]
        assert f"  {name}" in text and what.split()[0] in text and how_long in text


def test_train_help_lists_every_config_key(capsys):
    from medjax.config import RunConfig
    from medjax.train.__main__ import parse_args
    text = " ".join(_help(parse_args, ["--help"], capsys).split())
    assert "medjax/config.py" in text
    for section, cls in typing.get_type_hints(RunConfig).items():
        keys = ", ".join(f.name for f in dataclasses.fields(cls))
        assert f"{section}: {keys}" in text
