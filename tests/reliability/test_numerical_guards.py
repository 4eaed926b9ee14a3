"""NaN/inf guards with a REAL non-finite loss and gradient: one loss-mask entry of the batch is NaN,
so the jitted step computes NaN loss and NaN grads exactly as an fp16 overflow would.

Default: the run stops at that step, naming step and batch, and the last checkpoint is finite.
``optim.skip_nonfinite: true``: the update is skipped (params bit-identical across the step), the
skip is counted in the summary, and the run stops only after optax gives up (6 in a row).
"""
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from train_helpers import tiny_config, write_alpaca
from medjax.train.loop import Trainer, TrainingDiverged
from medjax.train.setup import base_model
from medjax.train.objectives import objective_for


def _trainer(tmp_path, model_dir, **over):
    data = write_alpaca(tmp_path / "a.jsonl")
    cfg = tiny_config(model_dir, data, tmp_path / "run", **over)
    model, tok = base_model(cfg)
    return Trainer(cfg, objective_for(cfg), model, tok, show_bar=False)


def _poison(trainer, bad_steps, record):
    """Wrap the jitted step: on ``bad_steps`` one loss-mask entry is NaN; record params per step."""
    real = trainer.step_fn

    def step_fn(state, frozen, reference, batch):
        step = int(state.step) + 1
        before = [np.array(x) for x in jax.tree.leaves(state.params)]
        if step in bad_steps:
            mask = np.array(batch["loss_mask"], np.float32)
            mask[0, np.argmax(mask[0] > 0)] = np.nan
            batch = dict(batch, loss_mask=jax.numpy.asarray(mask))
        state, metrics = real(state, frozen, reference, batch)
        record[step] = (before, [np.array(x) for x in jax.tree.leaves(state.params)])
        return state, metrics
    trainer.step_fn = step_fn


def test_nonfinite_loss_and_grads_stop_the_run_with_step_and_batch(rel_model_dir, tmp_path):
    trainer = _trainer(tmp_path, rel_model_dir, train__steps=6, checkpoint__every=2)
    _poison(trainer, {3}, {})
    with pytest.raises(TrainingDiverged, match=r"non-finite loss nan \(grad_norm nan\) at step 3, "
                                               r"batch .*last good checkpoint: 2"):
        trainer.train()
    assert trainer.ckpt.steps() == [2]
    state, _, step = trainer.ckpt.restore(trainer.state)
    assert step == 2 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_skip_nonfinite_skips_the_update_counts_it_and_finishes(rel_model_dir, tmp_path):
    trainer = _trainer(tmp_path, rel_model_dir, train__steps=6, optim__skip_nonfinite=True)
    record = {}
    _poison(trainer, {3, 5}, record)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = trainer.train()
    assert summary["skipped_nonfinite_steps"] == 2
    msgs = [str(w.message) for w in caught if "update skipped" in str(w.message)]
    assert len(msgs) == 2 and "at step 3, batch" in msgs[0] and "at step 5, batch" in msgs[1]
    for step in (3, 5):                      # the poisoned update was dropped entirely
        before, after = record[step]
        assert all(np.array_equal(b, a) for b, a in zip(before, after)), step
    for step in (2, 4, 6):                   # the others did update
        before, after = record[step]
        assert not all(np.array_equal(b, a) for b, a in zip(before, after)), step
    final = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(trainer.state.params)]
    assert all(np.isfinite(x).all() for x in final)


def test_skip_nonfinite_gives_up_after_optax_limit(rel_model_dir, tmp_path):
    trainer = _trainer(tmp_path, rel_model_dir, train__steps=8, optim__skip_nonfinite=True)
    _poison(trainer, set(range(2, 9)), {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingDiverged, match=r"at step 7, batch"):
            trainer.train()
