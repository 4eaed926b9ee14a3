"""``python -m medjax.bench train``: the interleaved repeat protocol (in process, fake runs) and
end to end on a tiny preset (both sides, separate processes)."""
import json

import numpy as np
import pytest

from medjax.bench import __main__ as bench
from medjax.bench import train


def test_spread_stats_min_median_spread():
    rates = [110.0, 100.0, 130.0, 90.0]
    s = train.spread_stats(rates)
    assert s["min"] == 90.0 and s["max"] == 130.0 and s["median"] == np.median(rates)
    assert s["spread"] == pytest.approx((130.0 - 90.0) / np.median(rates), abs=1e-3)


def test_runs_interleave_and_report_medians(monkeypatch, tmp_path, capsys):
    """Each side runs --repeats times in the order medjax, HF, medjax, HF...; the row holds the
    median/min/spread of the runs' tokens/s and the ratio of the median step times."""
    calls = []
    mj_steps, hf_steps = iter([0.5, 0.4, 0.8]), iter([0.6, 0.9, 0.7])
    from medjax.models import get_preset
    preset = get_preset("tiny-llama3")

    def fake_isolated(fn, *args):
        calls.append(fn.__name__)
        if fn is train._device_and_peak:
            return 1e9, "fake", "cpu", "float32"
        if fn is train.bench_medjax:
            return {"step_s": next(mj_steps), "first_step_s": 1.0, "loss": 1.0, "peak_gib": None,
                    "config": preset}
        return {"step_s": next(hf_steps), "first_step_s": 1.0, "loss": 1.0, "peak_gib": None}

    monkeypatch.setattr(train, "isolated", fake_isolated)
    out = tmp_path / "train.json"
    assert bench.main(["train", "--model", "preset:tiny-llama3", "--seq", "8", "--batch", "2",
                       "--modes", "lora", "--repeats", "3", "--json", str(out)]) == 0
    assert calls == ["_device_and_peak"] + ["bench_medjax", "bench_hf"] * 3
    res = json.loads(out.read_text())
    row, tokens = res["lora"], 2 * 8
    assert row["medjax_tokens_per_s"] == train.spread_stats([tokens / s for s in (0.5, 0.4, 0.8)])
    assert row["hf_tokens_per_s"] == train.spread_stats([tokens / s for s in (0.6, 0.9, 0.7)])
    assert row["medjax_step_s"] == 0.5 and row["hf_step_s"] == 0.7
    assert row["speedup_vs_hf"] == round(0.7 / 0.5, 2)
    assert res["repeats"] == 3 and len(res["load_average_start"]) == 3
    assert len(res["load_average_end"]) == 3
    text = capsys.readouterr().out
    assert "median ratio 1.4x" in text and "load average" in text


def test_bad_repeats_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["train", "--repeats", "0"])
    assert e.value.code == 2
    assert "--repeats" in capsys.readouterr().err


@pytest.mark.slow
def test_train_bench_tiny_preset_both_sides(tmp_path, capsys):
    out = tmp_path / "train.json"
    rc = bench.main(["train", "--model", "preset:tiny-llama3", "--seq", "32", "--steps", "1",
                     "--repeats", "1", "--rank", "4", "--modes", "lora", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    row = res["lora"]
    assert res["dtype"] == "float32" and res["backend"] == "cpu"
    assert row["medjax_tokens_per_s"]["median"] > 0 and row["hf_tokens_per_s"]["median"] > 0
    assert row["speedup_vs_hf"] > 0 and row["medjax_mfu"] > 0 and row["medjax_tflops"] > 0
    assert row["medjax_peak_gib"] is None          # no device memory stats on CPU
