"""Every ``python -m medjax...`` entry point, found by walking medjax/ (a module with an
``if __name__ == "__main__"`` guard, or a ``__main__.py``), turns bad input into ONE ``error:``
line (or argparse's usage error) and exit status 2: no traceback, nothing written.

Each is run in-process, through the ``main`` its guard calls and ``cli_errors.run_cli`` (what the
guard must call: checked on its source), with a bad option and with a path that does not exist.
A new entry point fails here until its guard uses ``run_cli`` and it has a row in ``BAD_PATH``.
"""
import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "medjax"
MISSING = "no_such_input_here"
# Not entry points of medjax: scripts `python -m medjax.bench peers` runs with a peer's own venv
# (EasyDeL, levanter), which has no medjax to import run_cli from (docs/PERFORMANCE.md).
PEER_SCRIPTS = PACKAGE / "bench" / "_peers"


def _is_main_guard(node) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def discover() -> dict[str, str]:
    """``{module: source of its __main__ block}`` for every entry point under medjax/."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if PEER_SCRIPTS in path.parents:
            continue
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__main__" else rel.parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guards = [ast.get_source_segment(path.read_text(encoding="utf-8"), n) for n in tree.body
                  if _is_main_guard(n)]
        if guards or rel.name == "__main__":
            found[module] = "\n".join(guards)
    return found


# module -> argv naming a path that does not exist (under tmp); its basename must be in the error
BAD_PATH = {
    "medjax.train": lambda t: ["--config", str(t / MISSING / "run.yaml")],
    "medjax.export": lambda t: ["--checkpoint", str(t / MISSING), "--out", str(t / "out")],
    "medjax.generate": lambda t: ["--model", str(t / MISSING), "--prompt", "hi"],
    "medjax.serve": lambda t: ["--model", str(t / MISSING), "--port", "0"],
    "medjax.bench": lambda t: ["data", "--tokenizer", str(t / MISSING)],
    "medjax.bench.data": lambda t: ["--tokenizer", str(t / MISSING)],
    "medjax.bench._gpu_parts": lambda t: ["smoke", "--rows", str(t / MISSING / "rows.jsonl")],
    "medjax.bench.fullsize": lambda t: ["--layers", "1", "--work", str(t / MISSING / "work")],
    "medjax.bench._fullsize_fixture": lambda t: ["--layers", "1", "--out", str(t / MISSING / "fx")],
    "medjax.bench.eval": lambda t: ["--model", str(t / MISSING), "--work-dir", str(t / "out")],
    "medjax.plan": lambda t: ["--config", str(t / MISSING / "run.yaml")],
    "medjax.recipes": lambda t: ["plan", "--recipe", "melt_llama2_lora", "--device", MISSING],
    "medjax.eval": lambda t: ["--model", str(t / "m"), "--data-dir", str(t / MISSING), "--tasks", "medqa",
                              "--output", str(t / "out" / "r.json")],
    "medjax.data": lambda t: ["inspect", "--config", str(t / MISSING / "run.yaml")],
    "medjax.arena": lambda t: ["--models", f"a={t / MISSING},b={t / MISSING}", "--judge", str(t / MISSING),
                               "--out", str(t / "out")],
}
ENTRY_POINTS = discover()


def _run(module, argv, capsys):
    from medjax.cli_errors import run_cli
    package = (PACKAGE.parent / module.replace(".", "/") / "__main__.py").exists()
    main = importlib.import_module(module + ".__main__" if package else module).main
    capsys.readouterr()
    rc = run_cli(main, argv)
    return rc, capsys.readouterr().err


def test_discovery_finds_the_known_entry_points():
    assert {"medjax.train", "medjax.generate", "medjax.eval", "medjax.bench"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_guard_runs_main_through_run_cli(module):
    block = ENTRY_POINTS[module]
    assert re.search(r"run_cli\(main\)", block), (
        f"{module}: its `if __name__ == '__main__'` block must be `sys.exit(run_cli(main))` "
        f"(medjax.cli_errors), so a UserError is one error line and exit 2; got:\n{block}")
    assert module in BAD_PATH, f"{module} is a new entry point: give it a row in BAD_PATH"


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_bad_option_is_a_usage_error(module, tmp_path, capsys):
    rc, err = _run(module, [*BAD_PATH[module](tmp_path), "--no-such-option"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert lines and re.match(r"^(error: |\S.*: error: )", lines[-1]), err[-2000:]
    assert "--no-such-option" in lines[-1]


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_missing_path_is_one_error_line(module, tmp_path, capsys):
    rc, err = _run(module, BAD_PATH[module](tmp_path), capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert lines and lines[-1].startswith("error: ") and MISSING in lines[-1], err[-2000:]
    assert not [p for p in tmp_path.rglob("*")], f"{module} wrote {list(tmp_path.rglob('*'))}"


def _benchmarks():
    from medjax.bench.__main__ import available
    return available()


@pytest.mark.parametrize("name", _benchmarks(), ids=lambda n: f"bench_{n}")  # not "gpu": a marker name
def test_every_benchmark_rejects_a_bad_option(name, capsys):
    """``python -m medjax.bench NAME`` runs ``medjax.bench.NAME.main``: an entry point too."""
    rc, err = _run("medjax.bench", [name, "--no-such-option"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err and lines and "--no-such-option" in lines[-1], err[-2000:]
