"""The loop on a tiny model: loss goes down, LoRA freezes the base, NaN stops the run."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from train_helpers import tiny_config
from medjax.train.loop import Trainer, TrainingDiverged
from medjax.train.setup import base_model
from medjax.train.objectives import objective_for


def _trainer(cfg):
    model, tok = base_model(cfg)
    return Trainer(cfg, objective_for(cfg), model, tok, show_bar=False)


def test_full_finetune_loss_decreases_over_30_steps(tiny_llama_dir, tiny_alpaca, tmp_path):
    cfg = tiny_config(tiny_llama_dir, tiny_alpaca, tmp_path / "run", train__steps=30,
                      optim__lr=3e-3)
    summary = _trainer(cfg).train()
    losses = [r["loss"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
              if r["kind"] == "train"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    assert (tmp_path / "run" / "loss_lr.png").stat().st_size > 1000
    assert list((tmp_path / "run" / "tensorboard").iterdir())


def test_lora_changes_only_adapters_and_base_is_bit_identical(tiny_llama_dir, tiny_alpaca, tmp_path):
    cfg = tiny_config(tiny_llama_dir, tiny_alpaca, tmp_path / "run", train__steps=8,
                      lora__enabled=True, lora__rank=4, lora__dropout=0.1)
    trainer = _trainer(cfg)
    base_before = {k: np.array(v.get_value()) for k, v in nnx.to_flat_state(trainer.frozen)}
    adapters_before = {k: np.array(v.get_value()) for k, v in nnx.to_flat_state(trainer.state.params)}
    assert all("lora_" in ".".join(map(str, k)) for k in adapters_before)
    from medjax.models.stack import per_layer_flat        # stacked layers: one entry per layer
    assert len(per_layer_flat(nnx.to_flat_state(trainer.state.params))) == 2 * 7 * 2  # (a, b) x 7 targets x 2 layers
    trainer.train()
    model = trainer.model()
    after = dict(nnx.to_flat_state(nnx.state(model)))
    for k, v in base_before.items():
        assert np.array_equal(np.asarray(after[k].get_value()), v), k
    changed = [k for k, v in adapters_before.items()
               if not np.array_equal(np.asarray(after[k].get_value()), v)]
    assert len(changed) == len(adapters_before)
    # the optimizer state holds adapter-shaped moments only
    n_opt = sum(x.size for x in jax.tree.leaves(trainer.state.opt_state))
    n_adapt = sum(v.size for v in adapters_before.values())
    assert n_opt <= 2 * n_adapt + 10


def test_nan_loss_stops_with_step_and_batch_and_keeps_last_good_checkpoint(
        tiny_llama_dir, tiny_alpaca, tmp_path):
    cfg = tiny_config(tiny_llama_dir, tiny_alpaca, tmp_path / "run", train__steps=6,
                      checkpoint__every=2)
    trainer = _trainer(cfg)
    real_step = trainer.step_fn

    def poisoned(state, frozen, reference, batch):          # step 5 produces a NaN loss
        state, metrics = real_step(state, frozen, reference, batch)
        if int(state.step) == 5:
            metrics = dict(metrics, loss=metrics["loss"] * np.nan)
        return state, metrics
    trainer.step_fn = poisoned
    with pytest.raises(TrainingDiverged, match=r"step 5, batch \{.*\}; last good checkpoint: 4"):
        trainer.train()
    assert trainer.ckpt.steps() == [2, 4]
