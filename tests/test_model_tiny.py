"""``model=tiny`` is the config loader's, so every command that takes ``--config`` understands it
with the same ``key=value`` overrides: plan, ``data inspect``, ``bench compile`` (train: the
recipes' tests)."""
from __future__ import annotations

from pathlib import Path

import pytest

from medjax.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
MELT_MIXTRAL = str(ROOT / "configs" / "melt_mixtral_lora.yaml")


def test_load_config_shrinks_a_recipe_to_its_family_tiny_run():
    cfg = load_config(MELT_MIXTRAL, ["model=tiny", "train.steps=3"])
    assert cfg.model.preset == "tiny-mixtral" and cfg.model.path is None
    assert cfg.lora.enabled and cfg.train.steps == 3 and cfg.train.out_dir == "runs/tiny/melt_mixtral_lora"
    assert cfg.data.train is not None and cfg.mesh.preset == "dp"
    with pytest.raises(ConfigError, match="model=tiny needs --config"):
        load_config(None, ["model=tiny"])


def test_plan_takes_model_tiny(capsys):
    from medjax.plan.__main__ import main
    assert main(["--config", MELT_MIXTRAL, "model=tiny", "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("medjax.plan: tiny-mixtral, LoRA r=8 · mesh dp"), out
    assert "(batch 4, grad_accum 2)" in out, out               # tiny_run_parts: 4 rows for its accum


def test_data_inspect_takes_model_tiny(capsys):
    """No model.path: the tiny preset's byte-level tokenizer renders the stand-in data."""
    from medjax.data.__main__ import main
    assert main(["inspect", "--config", MELT_MIXTRAL, "model=tiny", "data.max_rows=8", "--no-color",
                 "--examples", "1", "--batches", "1", "--lengths", "8"]) == 0
    out = capsys.readouterr().out
    assert "format alpaca" in out and "non-pad fraction" in out


def test_bench_compile_takes_model_tiny(monkeypatch, capsys):
    from medjax.bench import compile as bench_compile
    from medjax.bench.compile import run_config
    measured = []
    monkeypatch.setattr(bench_compile, "measure", lambda layers, cfg: measured.append((layers, cfg)) or {})
    assert bench_compile.main(["--one=2,loop", "--config", MELT_MIXTRAL, "model=tiny"]) == 0
    [(layers, cfg)] = measured
    assert layers == 2 and cfg.model.preset == "tiny-mixtral" and not cfg.model.scan_layers

    cfg = run_config([MELT_MIXTRAL], ["model=tiny", "lora.rank=4"], scan=False)
    assert cfg.model.preset == "tiny-mixtral" and cfg.lora.enabled and cfg.lora.rank == 4
    assert not cfg.model.scan_layers and cfg.model.attention == "xla" and cfg.mesh.preset == "dp"
    assert run_config(None, [], full=True).model.preset == "tiny-llama2"    # the default run
    assert not run_config(None, [], full=True).lora.enabled
