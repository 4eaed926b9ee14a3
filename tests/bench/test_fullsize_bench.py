"""``python -m medjax.bench fullsize``'s own mechanics (the full run is the benchmark itself; the
slow product-path test is tests/hf/test_fullsize.py)."""
import json
import subprocess
import sys

from medjax.bench import __main__ as bench
from medjax.bench import fullsize


def test_registered_and_fixture_module_is_not_a_benchmark():
    assert "fullsize" in bench.available()
    assert "_fullsize_fixture" not in bench.available()


def test_phase_rows_measure_each_child_alone(tmp_path):
    """Peak RSS is the child's own (wait4), not the largest child so far: a 1 GiB child, then a
    small one. Linux counts a child's high-water mark from the fork, so the launcher runs in a
    fresh process, as ``python -m medjax.bench fullsize`` does (a grown pytest process would
    make every child read as at least pytest's size)."""
    launcher = f"""
import json, sys
from medjax.bench import fullsize
touch_1gib = "b = bytearray(2**30); b[::4096] = b'x' * len(b[::4096])"
rows = [fullsize.run_phase(name, [sys.executable, "-c", code], {str(tmp_path / "log")!r})
        for name, code in (("big", touch_1gib), ("small", "pass"), ("failed", "raise SystemExit(3)"))]
print(json.dumps(rows))
"""
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    big, small, failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert big["rc"] == small["rc"] == 0 and failed["rc"] == 3
    assert big["peak_rss_gib"] >= 1.0
    assert small["peak_rss_gib"] < big["peak_rss_gib"] - 0.5


def test_train_breakdown(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"total_seconds": 70.0, "train_seconds": 47.5,
                                                       "load_peak_rss_gib": 3.1, "setup_peak_rss_gib": 3.8}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "kind": "train", "step_time_s": 31.0}, {"step": 1, "kind": "eval", "step_time_s": 99},
        {"step": 2, "kind": "train", "step_time_s": 14.0},
        {"step": 3, "kind": "train", "step_time_s": 16.0}]))
    assert fullsize.train_breakdown(tmp_path) == {"load_setup_s": 22.5, "first_step_s": 31.0, "step_s": 15.0,
                                                  "load_peak_rss_gib": 3.1, "setup_peak_rss_gib": 3.8}


def test_fp32_comparisons_compute_in_fp32_over_the_bf16_weights(tmp_path):
    """The fullsize comparisons' fp32 mode: transformers with each decoder layer upcast as it runs,
    and medjax with every module's compute dtype float32, both over the same bf16 weights, equal
    the same model loaded in fp32 (and each other); the bf16 forwards differ from them."""
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    import medjax
    from hf_fixtures import make_tiny_hf_model
    make_tiny_hf_model("llama3", seed=3).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ids = list(range(3, 19))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    hf_fp32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    theirs = fullsize._torch_logits(hf, ids)
    want = fullsize._torch_logits(hf_fp32, ids, fp32=False)
    assert fullsize.rel_err(theirs, want) < 1e-5
    assert all(p.dtype == torch.bfloat16 for p in hf.model.layers.parameters())   # cast back
    ours_bf16, _ = medjax.load(tmp_path / "bf16", dtype=jnp.bfloat16, progress=False)
    ours = fullsize._medjax_logits(ours_bf16, ids)
    assert fullsize.rel_err(ours, want) < 1e-4
    ours_bf16, _ = medjax.load(tmp_path / "bf16", dtype=jnp.bfloat16, progress=False)
    assert fullsize.rel_err(fullsize._medjax_logits(ours_bf16, ids, fp32=False), want) > 1e-4


def test_q8_0_excess_accepts_q8_0_rounding_and_catches_a_layout_error():
    import gguf
    import numpy as np
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    t = gguf.GGMLQuantizationType.Q8_0
    back = gguf.quants.dequantize(gguf.quants.quantize(w, t), t).reshape(w.shape)
    assert 0.3 < fullsize._q8_0_excess(back, w) <= 0.51
    assert fullsize._q8_0_excess(back.reshape(256, 64).T.copy(), w) > 10    # a transpose bug
