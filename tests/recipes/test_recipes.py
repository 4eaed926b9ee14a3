"""Every seed recipe: its YAML validates, `model=tiny` runs it end to end on CPU, the planner
prints its full-size memory."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from medjax.config import TINY_PRESETS, ConfigError
from medjax.recipes import PLANNED_DEVICES, RECIPES, load_recipe, plan_recipe

# Every recipe but DPO runs end to end (10 steps, eval, export) through ``python -m medjax.train``'s
# main; DPO, whose default base is the SFT export, takes two steps on its own. In the default run
# (not slow): these, for remat through a quantized base and DPO's reference besides the plain ones.
END_TO_END = tuple(n for n in RECIPES if n != "med42_dpo")
FAST = ("melt_llama2_lora", "internist_mistral_cpt", "meditron_llama2_cpt", "bimedix_mixtral_qlora")


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_yaml_validates_and_names_its_base_model(name):
    cfg = load_recipe(name, ["model.path=/models/base", "data.train=/data/train.jsonl"])
    assert cfg.train.recipe == name and cfg.model.preset in TINY_PRESETS and cfg.eval.tasks
    if name != "med42_dpo":                      # DPO starts from the SFT export by default
        with pytest.raises(ConfigError, match="model.path is required"):
            load_recipe(name, ["data.train=/data/train.jsonl"])
    tiny = load_recipe(name, ["model=tiny"])
    assert tiny.model.preset == TINY_PRESETS[cfg.model.preset] and tiny.model.path is None
    for section in ("lora", "dpo"):               # the method is the card's, only the scale changes
        assert getattr(tiny, section).__class__ is getattr(cfg, section).__class__
    assert (tiny.lora.enabled, tiny.lora.quantize, tiny.lora.targets, tiny.train.neftune_alpha,
            tiny.train.objective) == (cfg.lora.enabled, cfg.lora.quantize, cfg.lora.targets,
                                      cfg.train.neftune_alpha, cfg.train.objective)
    # mechanisms are kept too: activation checkpointing and gradient accumulation
    assert (tiny.model.remat, tiny.train.grad_accum) == (cfg.model.remat, cfg.train.grad_accum)
    assert tiny.train.batch_size % tiny.train.grad_accum == 0


def test_every_config_but_the_demo_is_a_recipe():
    configs = {p.stem for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")}
    assert configs - {"demo"} == set(RECIPES)


@pytest.mark.parametrize("name", [n for n in RECIPES if n not in END_TO_END])
def test_recipe_takes_two_optimizer_steps_at_tiny_size(name, tmp_path, monkeypatch):
    """``python -m medjax.train --config configs/NAME.yaml model=tiny`` with the recipe's own
    remat / grad_accum / LoRA / QLoRA / NEFTune / DPO settings (2 steps instead of 10), for the
    recipes ``test_tiny_recipe_runs_end_to_end`` does not run."""
    monkeypatch.chdir(tmp_path)                 # runs/tiny/NAME lands here; no eval data here
    _train_main(name, "train.steps=2")
    losses = _train_losses(tmp_path / "runs" / "tiny" / name)
    assert len(losses) == 2 and all(np.isfinite(losses))


def _train_main(name, *overrides):
    """``python -m medjax.train --config configs/NAME.yaml model=tiny OVERRIDES`` (its main, here)."""
    from medjax.train.__main__ import main
    config = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    assert main(["--config", str(config), "model=tiny", *overrides, "--no-progress"]) == 0


def test_card_settings_are_in_the_configs():
    internist = load_recipe("internist_mistral_cpt", check_inputs=False)
    o = internist.optim
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.lr, o.min_lr, o.warmup_steps) == (
        0.9, 0.95, 1e-5, 0.1, 6e-6, 1e-8, 100)
    assert internist.train.neftune_alpha == 5 and internist.data.pack and internist.data.seq_len == 4096
    assert internist.train.batch_size * internist.data.seq_len == 196_608
    bimedix = load_recipe("bimedix_mixtral_qlora", check_inputs=False)
    assert bimedix.lora.quantize == "nf4" and "block_sparse_moe.gate" in bimedix.lora.targets
    melt = load_recipe("melt_mixtral_lora", check_inputs=False)
    assert (melt.lora.rank, melt.lora.alpha, melt.optim.lr, melt.train.epochs) == (64, 16, 2e-4, 3)
    med42 = load_recipe("med42_dpo", ["data.train=/x.jsonl"])
    assert med42.train.objective == "dpo" and med42.data.chat_template == "llama3"


def test_planner_prints_full_size_memory_and_bimedix_trainable_share():
    text = plan_recipe("bimedix_mixtral_qlora")
    assert "params" in text and "optimizer state" in text and "activations" in text
    m = re.search(r"([\d,]+) params, ([\d,]+) trainable", text)
    total, trainable = (int(g.replace(",", "")) for g in m.groups())
    assert 0.03 < trainable / total < 0.05                       # card: ~4% trainable
    assert set(PLANNED_DEVICES) == set(RECIPES)


def _train_losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(Path(out_dir) / "metrics.jsonl"))
            if r["kind"] == "train"]


def _run_tiny(name, tmp_path, *extra):
    from medjax.run import run
    cfg = load_recipe(name, ["model=tiny", f"train.out_dir={tmp_path / name}", *extra])
    return cfg, run(cfg, show_bar=False)


def _check_run(summary, benchmarks):
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"], summary
    assert Path(summary["exports"]["hf"], "config.json").is_file()
    if benchmarks is not None:                                   # a few real benchmark items scored
        results = summary["eval"]["results"]
        assert results and all(r for r in results.values()), summary["eval"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow)
                                  for n in END_TO_END])
def test_tiny_recipe_runs_end_to_end(name, tmp_path, benchmarks_dir, monkeypatch):
    """The README's ``python -m medjax.train --config configs/NAME.yaml model=tiny`` with the
    recipe's own remat / grad_accum / LoRA / QLoRA / NEFTune settings: 10 steps, the held-out
    loss falls, the eval scores real benchmark items, the HF export is written."""
    monkeypatch.chdir(tmp_path)                 # runs/tiny/NAME lands here
    _train_main(name, f"eval.data_dir={benchmarks_dir}")
    out_dir = tmp_path / "runs" / "tiny" / name
    _check_run(json.loads((out_dir / "summary.json").read_text()), benchmarks_dir)
    losses = _train_losses(out_dir)
    assert len(losses) == 10


@pytest.mark.slow
def test_tiny_med42_sft_then_dpo_raises_the_preference_margin(tmp_path, benchmarks_dir):
    from medjax.config import tiny_data
    sft_cfg, sft = _run_tiny("med42_llama3_sft", tmp_path, f"eval.data_dir={benchmarks_dir}")
    # Pairs a tiny model can learn: the stand-in data's rejected answer is another question's
    # answer, so telling them apart needs question-answer knowledge that 15 steps of a random
    # byte-level model do not acquire (its margins moved by noise, either way). Here the rejected
    # answer is one fixed non-answer, and the margin is measured on the pairs trained on.
    rows = [json.loads(line) for line in Path(tiny_data("preference")).read_text().splitlines()[:16]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({**r, "rejected": "I cannot answer that."}) + "\n" for r in rows))
    cfg, summary = _run_tiny("med42_dpo", tmp_path, f"model.path={sft['exports']['hf']}",
                             f"data.train={pairs}", f"data.eval={pairs}", "data.heldout_rows=0",
                             "train.steps=15", "train.batch_size=8", "optim.lr=0.0003",
                             f"eval.data_dir={benchmarks_dir}")
    before, after = summary["heldout_before"], summary["heldout_after"]
    assert after["rewards_margin"] > before["rewards_margin"] + 0.02, (before, after)
    assert after["rewards_accuracy"] >= before["rewards_accuracy"]
    assert after["loss"] < before["loss"]
    assert Path(summary["exports"]["hf"], "config.json").is_file()


def test_recipes_cli_lists_every_recipe_with_its_planned_hardware(capsys):
    """``python -m medjax.recipes list`` (medjax/recipes/__main__.py) reads the library's tables."""
    from medjax.recipes.__main__ import main
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(RECIPES)
    for name, line in zip(RECIPES, lines):
        device, count = PLANNED_DEVICES[name]
        assert line.startswith(name) and f"configs/{name}.yaml" in line and f"{count} x {device}" in line
