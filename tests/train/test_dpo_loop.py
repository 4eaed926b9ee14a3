"""DPO runs through the ONE training loop, so it has what the loop has: preemption + identical
resume, skip-nonfinite, epochs, NEFTune, held-out rows / max_rows, sharded eval."""
import json
import os
import signal
import traceback
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from train_helpers import FACTS, tiny_config
from medjax.run import run
from medjax.train.loop import Trainer, TrainingInterrupted
from medjax.train.setup import base_model
from medjax.train.objectives import DPO, objective_for

ROOT = Path(__file__).resolve().parents[2]


def write_pairs(path: Path, n: int = 12) -> Path:
    rows = []
    for i in range(n):
        name, what = FACTS[i % len(FACTS)]
        wrong = FACTS[(i + 3) % len(FACTS)][1]
        rows.append({"prompt": f"What is {name}?", "chosen": f"{name} is {what}.",
                     "rejected": f"{name} is {wrong}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_config(model_dir, tmp_path, name, **over):
    """12 pairs: 4 held out (data.heldout_rows), 8 train rows = 2 batches of 4 per epoch."""
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    kw = dict(data__format="preference", train__objective="dpo", data__heldout_rows=4,
              train__epochs=2, train__neftune_alpha=5.0, lora__enabled=True, lora__rank=4,
              lora__dropout=0.1, optim__lr=5e-3, train__eval_batches=1, data__seq_len=256)
    kw.update(over)
    return tiny_config(model_dir, pairs, tmp_path / name, **kw)


def _losses(run_dir):
    from medjax.train.metrics import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")
            if r["kind"] == "train"}


def _trainer(cfg):
    model, tok = base_model(cfg)
    return Trainer(cfg, objective_for(cfg), model, tok, show_bar=False)


def test_dpo_honours_epochs_survives_sigterm_and_resumes_identically(tiny_llama_dir, tmp_path):
    ref_cfg = dpo_config(tiny_llama_dir, tmp_path, "ref")
    ref = run(ref_cfg, show_bar=False)
    # train.epochs=2 over (12 - 4 held out) rows in batches of 4: 4 steps
    assert ref["steps"] == 4 and sorted(_losses(ref_cfg.train.out_dir)) == [1, 2, 3, 4]
    assert ref["objective"] == "dpo" and ref["heldout_before"]["pairs"] > 0   # held-out rows scored
    assert ref["heldout_after"]["loss"] != ref["heldout_before"]["loss"]       # the policy moved

    cut_cfg = dpo_config(tiny_llama_dir, tmp_path, "cut")
    trainer = _trainer(cut_cfg)
    real = trainer.step_fn

    def preempted(state, *rest):                      # SIGTERM arrives during step 2
        if int(state.step) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(state, *rest)
    trainer.step_fn = preempted
    with pytest.raises(TrainingInterrupted, match="SIGTERM received: stopped after step 2"):
        trainer.train()
    assert trainer.ckpt.steps() == [2]
    resumed = run(cut_cfg, resume=True, show_bar=False)
    assert resumed["start_step"] == 2
    cut, ref_losses = _losses(cut_cfg.train.out_dir), _losses(ref_cfg.train.out_dir)
    assert [cut[s] for s in (1, 2, 3, 4)] == [ref_losses[s] for s in (1, 2, 3, 4)]


def test_dpo_skips_a_nonfinite_update_and_evaluates_with_shardings(tiny_llama_dir, tmp_path):
    cfg = dpo_config(tiny_llama_dir, tmp_path, "skip", optim__skip_nonfinite=True, train__epochs=None,
                     train__steps=3)
    trainer = _trainer(cfg)
    real, params_at = trainer.step_fn, {}

    def poisoned(state, frozen, reference, batch):
        step = int(state.step) + 1
        if step == 2:
            mask = np.array(batch["chosen_loss_mask"], np.float32)
            mask[0, np.argmax(mask[0] > 0)] = np.nan
            batch = dict(batch, chosen_loss_mask=jax.numpy.asarray(mask))
        before = [np.array(x) for x in jax.tree.leaves(state.params)]
        state, metrics = real(state, frozen, reference, batch)
        params_at[step] = (before, [np.array(x) for x in jax.tree.leaves(state.params)])
        return state, metrics
    trainer.step_fn = poisoned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = trainer.train()
    assert summary["skipped_nonfinite_steps"] == 1
    assert any("non-finite loss" in str(w.message) and "step 2" in str(w.message) for w in caught)
    before, after = params_at[2]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))          # update dropped
    assert any(not np.array_equal(a, b) for a, b in zip(*params_at[3]))      # training went on
    # the held-out DPO eval is jitted with the train state's shardings on the run's mesh
    t = trainer.trainable
    compiled = t.eval_fn.lower(trainer.state.params, trainer.state.rngs, t.frozen, t.reference,
                               trainer._batch(trainer.heldout[0])).compile()
    param_sh = jax.tree.leaves(compiled.input_shardings[0][0])
    assert param_sh and all(s.mesh.axis_names == t.mesh.axis_names for s in param_sh)


def test_dpo_objective_adds_neftune_noise_in_training_only(tiny_llama_dir, tmp_path):
    from medjax.sharding import make_mesh
    from medjax.train.loop import prepare_data
    from medjax.train.setup import build_trainable
    results = {}
    for alpha in (0.0, 5.0):
        cfg = dpo_config(tiny_llama_dir, tmp_path, "neftune", train__neftune_alpha=alpha)
        model, tok = base_model(cfg)
        batch = next(prepare_data(cfg, tok)[0])
        t = build_trainable(cfg, model, make_mesh(cfg.mesh))
        assert isinstance(t.objective, DPO) and hasattr(t.model(), "neftune") == bool(alpha)
        pairs = {k: jax.numpy.asarray(batch[k]) for k in t.objective.batch_keys}
        args = (t.state.params, t.state.rngs, t.frozen, t.reference, pairs)
        loss = t.objective.loss(*args, 1.0, graphdef=t.graphdef, n_micro=1)[0]
        ev = t.objective.eval_stats(*args, graphdef=t.graphdef)
        results[alpha] = (float(loss), float(ev["logps_chosen"]))
    assert results[5.0][0] != results[0.0][0]          # noisy embeddings in the training loss
    assert results[5.0][1] == results[0.0][1]          # eval sees none


def _failing_loss(*args, **kwargs):
    raise RuntimeError("injected objective failure")


@pytest.mark.parametrize("recipe", ["med42_llama3_sft", "med42_dpo"])
def test_sft_and_dpo_recipes_fail_through_the_same_loop(recipe, tmp_path, monkeypatch):
    """An injected failure in the objective's loss surfaces through the same frames for SFT and
    DPO: ``python -m medjax.train`` → medjax.run.run → Trainer.train → the setup's jitted step."""
    from medjax.train.__main__ import main
    from medjax.train import objectives
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(objectives.CausalLM, "loss", _failing_loss)
    monkeypatch.setattr(objectives.DPO, "loss", _failing_loss)
    with pytest.raises(RuntimeError, match="injected objective failure") as info:
        main(["--config", str(ROOT / "configs" / f"{recipe}.yaml"), "model=tiny", "train.steps=1",
              "--no-progress"])
    frames = [(Path(f.filename).name, f.name) for f in traceback.extract_tb(info.value.__traceback__)]
    medjax_frames = [f for f in frames if f[1] != "_failing_loss"]
    for frame in [("__main__.py", "main"), ("run.py", "run"), ("loop.py", "train"),
                  ("step.py", "train_step"), ("step.py", "accumulate_grads")]:
        assert frame in medjax_frames, (frame, frames)


def test_dpo_checks_the_global_batch_for_answer_tokens():
    """A batch whose rows are all padding on this process's devices is fine when the global batch
    holds an answer token; a global batch without one stops with a DataError."""
    from medjax.config import MeshSection
    from medjax.errors import DataError
    from medjax.sharding import global_batch, make_mesh
    mask = np.zeros((8, 16), np.float32)
    mask[0, 3] = 1.0                        # one scored token, in the first device's rows
    batch = global_batch({"chosen_loss_mask": mask, "rejected_loss_mask": mask}, make_mesh(MeshSection(preset="dp")))
    DPO().check_batch(batch)
    with pytest.raises(DataError, match="no preference pair keeps an answer token"):
        DPO().check_batch({"chosen_loss_mask": mask, "rejected_loss_mask": np.zeros_like(mask)})
