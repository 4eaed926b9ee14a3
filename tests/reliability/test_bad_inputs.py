"""Table-driven bad inputs: each gives ONE line ``error: ...`` naming the culprit, exit 2, no
traceback, no output (not even an empty run directory). Cases live in bad_input_cases.py; each runs through the real CLI's
``main`` under ``medjax.cli_errors.run_cli`` (exactly what ``python -m medjax.X`` does), and the
cases in SUBPROCESS_CASES also as real ``python -m`` subprocesses.
"""
import re
import subprocess
import sys

import pytest

from bad_input_cases import ALL_CASES, SUBPROCESS_CASES, Ctx
from reliability_helpers import FIGURES, ROOT, env

ERROR_LINE = re.compile(r"^(config )?error: \S")
MODULES = {"train": "medjax.train", "eval": "medjax.eval", "export": "medjax.export", "data": "medjax.data",
           "generate": "medjax.generate"}


def _main(cli):
    if cli == "train":
        from medjax.train.__main__ import main
    elif cli == "eval":
        from medjax.eval.__main__ import main
    elif cli == "export":
        from medjax.export.__main__ import main
    elif cli == "generate":
        from medjax.generate.__main__ import main
    else:
        from medjax.data.__main__ import main
    return main


def _check(case_id, expect, call, rc, err):
    """Problems with one case's outcome ([] when it was a clean, precise error)."""
    problems = []
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if rc != 2:
        problems.append(f"exit status {rc}, expected 2")
    if "Traceback" in err:
        problems.append("traceback printed")
    if not ERROR_LINE.match(last):
        problems.append(f"last stderr line is not 'error: ...': {last[:300]!r}")
    missing = [s for s in expect if s not in last]
    if missing:
        problems.append(f"error line lacks {missing}: {last[:400]!r}")
    for out in call.outputs:          # not even an empty run directory (inputs are checked first)
        if out.exists():
            left = [str(p) for p in out.rglob("*")][:3] if out.is_dir() else []
            problems.append(f"output left behind: {out} {left}")
    return problems


@pytest.fixture(scope="module")
def outcomes():
    return {}


PARAMS = [pytest.param(*c, id=c[0]) for c in ALL_CASES]


@pytest.mark.parametrize("case_id,expect,build", PARAMS)
def test_bad_input(case_id, expect, build, rel_model_dir, rel_text_data, tmp_path, capsys, outcomes):
    from medjax.cli_errors import run_cli
    call = build(Ctx(tmp_path, rel_model_dir, rel_text_data))
    expect = tuple(expect) + tuple(call.expect)
    capsys.readouterr()
    if call.cli == "api":
        def api_main(argv):
            call.api()
            return 0
        rc = run_cli(api_main)
    else:
        rc = run_cli(_main(call.cli), call.argv)
    err = capsys.readouterr().err
    problems = _check(case_id, expect, call, rc, err)
    if case_id in SUBPROCESS_CASES and not problems:
        for out in call.outputs:  # the subprocess must start from the same (absent) outputs
            assert not out.exists()
        proc = subprocess.run([sys.executable, "-m", MODULES[call.cli], *call.argv], capture_output=True,
                              text=True, env=env(tmp_path / "jax_cache"), cwd=str(ROOT), timeout=300)
        problems += [f"(subprocess) {p}" for p in _check(case_id, expect, call, proc.returncode, proc.stderr)]
    outcomes[case_id] = not problems
    FIGURES["bad_inputs_tried"] += 1
    FIGURES["bad_inputs_clean"] += not problems
    assert not problems, f"{case_id}: " + "; ".join(problems) + f"\n--- stderr ---\n{err[-2500:]}"


def test_bad_input_count(outcomes):
    """Runs last in this file: the table is big enough and the figure is printed."""
    assert len(ALL_CASES) >= 40
    print(f"\nbad inputs: {sum(outcomes.values())} clean errors / {len(outcomes)} tried")
