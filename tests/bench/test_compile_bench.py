"""``python -m medjax.bench compile``: the table of compile times, one fresh process per cell."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_compile_bench_prints_both_layouts(tmp_path):
    out = subprocess.run([sys.executable, "-m", "medjax.bench", "compile", "--layers", "1,3",
                          "--seq", "16", "--json", str(tmp_path / "c.json")], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scan: step (lower + compile) at 3 layers / at 1 layers" in out.stdout, out.stdout
    rows = json.loads((tmp_path / "c.json").read_text())
    assert [r["layers"] for r in rows] == [1, 3]
    for r in rows:
        for layout in ("scan", "loop"):
            assert r[layout]["compile_s"] > 0 and r[layout]["lower_s"] > 0
