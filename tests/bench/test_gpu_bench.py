"""``python -m medjax.bench gpu``: part isolation (failures, timeouts, a failed smoke part) and the
dry run end to end through the same entry point the GPU command uses."""
import json
import os
import sys
from pathlib import Path

import pytest

from medjax.bench.__main__ import main as bench_main
from medjax.bench import gpu
from medjax.ops.hardware import CHIPS, chip_of

# Imported by medjax elsewhere but absent from the lent GPU image (docs/GPU.md): the check must
# not need them.
NOT_ON_IMAGE = ("grain", "tensorflow_datasets", "array_record", "gguf", "tensorboardX", "lm_eval")


def test_chip_of_reads_the_one_device_table():
    assert chip_of("NVIDIA H100 80GB HBM3") is CHIPS["h100"]
    assert chip_of("NVIDIA H200") is CHIPS["h200"]
    assert chip_of("TPU v5p") is CHIPS["v5p"]
    assert chip_of("cpu") is None


def test_full_shapes_are_the_issues_and_fit_eight_minutes():
    from medjax.bench._gpu_sizes import FULL
    from medjax.models import get_preset
    assert FULL["attention"]["seqs"] == (2048, 4096, 8192, 32768)
    assert set(FULL["attention"]["heads"]) == {(32, 32), (32, 8)} and FULL["attention"]["D"] == 128
    for preset, heads in (("llama2-7b", (32, 32)), ("llama3-8b", (32, 8))):
        cfg = get_preset(preset)
        assert (cfg.num_heads, cfg.num_kv_heads) == heads and cfg.head_dim == 128
    train = FULL["train"]
    assert (train["model"], train["seq"], train["batches"], train["rank"]) == \
        ("preset:llama2-7b", 4096, (1, 2, 4), 64)
    assert FULL["mcqa"]["items"] == 256 and FULL["decode"]["batches"] == (1, 16)
    assert FULL["decode"]["new"] == 512
    assert FULL["moe"]["preset"] == "mixtral-8x7b" and FULL["moe"]["tokens"] == 4096
    assert sum(budget for _, budget, _ in gpu.PARTS) <= 8 * 60


def test_launch_keeps_rows_of_a_part_that_runs_out_of_time(tmp_path):
    rows = tmp_path / "rows.jsonl"
    code = (f"import json, time; open({str(rows)!r}, 'a').write(json.dumps({{'case': 'a'}}) + '\\n');"
            " time.sleep(60)")
    res = gpu.launch([sys.executable, "-c", code], 3, rows)
    assert res["rows"] == [{"case": "a"}]
    assert res["error"] == "timed out after its budget of 3 s" and res["seconds"] < 30


def test_launch_reports_the_parts_own_error_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    code = (f"import json, sys; f = open({str(rows)!r}, 'a'); f.write(json.dumps({{'case': 'a'}}) + '\\n');"
            " f.write(json.dumps({'error': 'RuntimeError: boom'}) + '\\n'); f.close(); sys.exit(1)")
    res = gpu.launch([sys.executable, "-c", code], 30, rows)
    assert res["rows"] == [{"case": "a"}] and res["error"] == "RuntimeError: boom"


def _fake_launcher(errors):
    def launcher(cmd, budget, rows_file):
        name = cmd[cmd.index("medjax.bench._gpu_parts") + 1]
        rows = [{"part": name, "case": "environment", "device": "Fake GPU", "backend": "gpu",
                 "versions": {}}] if name == "smoke" else [{"part": name, "case": "c", "ms": 1.0}]
        return {"rows": rows, "error": errors.get(name), "seconds": 0.1}
    return launcher


def test_a_failed_part_is_recorded_and_the_rest_go_on(tmp_path):
    result = gpu.run(gpu.PARTS, dry_run=True, out=tmp_path,
                     launcher=_fake_launcher({"train": "timed out after its budget of 150 s"}))
    assert list(result["parts"]) == [name for name, *_ in gpu.PARTS]
    assert result["parts"]["train"]["error"].startswith("timed out")
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| train | (part) |" in table and "timed out after its budget of 150 s" in table
    assert "Fake GPU (gpu)" in table.splitlines()[0]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["moe"]["error"] is None


def test_a_failed_smoke_part_stops_the_check(tmp_path):
    result = gpu.run(gpu.PARTS, dry_run=True, out=tmp_path,
                     launcher=_fake_launcher({"smoke": "ImportError: no module named flax"}))
    assert list(result["parts"]) == ["smoke"]
    assert "ImportError: no module named flax" in (tmp_path / "gpu_check.md").read_text()


def test_unknown_part_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["gpu", "--parts", "smoke,speed"])
    assert e.value.code == 2 and "speed" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_runs_every_part_without_the_packages_the_image_lacks(tmp_path, monkeypatch):
    blockers = tmp_path / "not_on_image"
    for name in NOT_ON_IMAGE:
        (blockers / name).mkdir(parents=True)
        (blockers / name / "__init__.py").write_text(f"raise ImportError('{name}: not on the GPU image')\n")
    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(blockers)]))
    out = tmp_path / "out"
    assert bench_main(["gpu", "--dry-run", "--out", str(out)]) == 0
    result = json.loads((out / "gpu_check.json").read_text())
    assert {name: p["error"] for name, p in result["parts"].items()} == \
        {name: None for name, *_ in gpu.PARTS}
    rows = result["rows"]
    assert {r["part"] for r in rows} == {name for name, *_ in gpu.PARTS}
    failed = [r for r in rows if r.get("error")]
    assert all(r["impl"] == "cudnn" and "needs a CUDA GPU" in r["error"] for r in failed), failed
    attention = [r for r in rows if r["part"] in ("smoke", "attention") and "max_err" in r]
    assert len(attention) == 5 and all(r["max_err"] < 0.1 for r in attention)  # bf16 vs fp32
    for part, impls in {"train": {"medjax", "transformers+peft"},
                        "decode": {"medjax Generator", "transformers.generate"}}.items():
        assert {r["impl"] for r in rows if r["part"] == part} == impls
        assert all(r["rate"] > 0 for r in rows if r["part"] == part)
    assert all(r.get("speedup", 1) > 0 for r in rows)
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("# medjax GPU check: cpu (cpu), jax ") and "(dry run)" in table
