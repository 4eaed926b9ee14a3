"""``python -m medjax.bench train`` end to end on a tiny preset (both sides, separate processes)."""
import json

import pytest

from medjax import bench


@pytest.mark.slow
def test_train_bench_tiny_preset_both_sides(tmp_path, capsys):
    out = tmp_path / "train.json"
    rc = bench.main(["train", "--model", "preset:tiny-llama3", "--seq", "32", "--steps", "1",
                     "--rank", "4", "--modes", "lora", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    row = res["lora"]
    assert res["dtype"] == "float32" and res["backend"] == "cpu"
    assert row["medjax_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0
    assert row["speedup_vs_hf"] > 0 and row["medjax_mfu"] > 0 and row["medjax_tflops"] > 0
    assert row["medjax_peak_gib"] is None          # no device memory stats on CPU
