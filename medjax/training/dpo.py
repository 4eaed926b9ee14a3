"""Direct preference optimisation (Rafailov et al. 2023), as Med42-v2 used after SFT.

For a prompt ``x`` with a preferred answer ``y_w`` and a rejected one ``y_l``, with ``π`` the
policy being trained and ``π_ref`` the frozen reference (the SFT model):

    h      = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]
    loss   = −(1 − ε) · log σ(h) − ε · log σ(−h)          (ε = label smoothing; cDPO)
    reward_w = β (log π(y_w|x) − log π_ref(y_w|x)),  reward_l likewise;  accuracy = [reward_w > reward_l]

``log π(y|x)`` is the summed log-probability of the answer tokens (``loss_mask``). Batches come
from ``medjax.data`` with ``data.format=preference``: ``chosen_*`` and ``rejected_*`` rows
(``input_ids, targets, loss_mask, positions, segment_ids``); when packed, segment ``k`` of a
chosen row and segment ``k`` of the same rejected row are one pair, so sums are taken per
(row, segment) with ``segment_sum``.

The reference costs no second copy of the weights with LoRA: it is the same model with every
``nnx.LoRAParam`` set to zero (``B = 0`` makes each adapter's contribution exactly 0), i.e. the
frozen base. For full fine-tuning the reference is a frozen copy of the initial parameters
(``frozen_copy``), kept beside the train state and never updated. Reference log-probs are
computed in the same step without gradient.
"""
from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medjax.training import step as S
from medjax.training.loop import Trainer

PAIR_KEYS = tuple(p + k for p in ("chosen_", "rejected_") for k in S.BATCH_KEYS)


# ------------------------------------------------------------------------------ formula
def segment_logps(logits_BTV, targets_BT, loss_mask_BT, segment_ids_BT):
    """``(logp_BS, count_BS)``: summed answer log-probs and answer-token counts per (row,
    segment id); ``S = T + 1`` slots, slot 0 = padding."""
    B, T = targets_BT.shape
    token_logp_BT = -S.token_nll(logits_BTV, targets_BT) * loss_mask_BT
    ids = (jnp.arange(B)[:, None] * (T + 1) + segment_ids_BT).reshape(-1)
    logp = jax.ops.segment_sum(token_logp_BT.reshape(-1), ids, num_segments=B * (T + 1))
    count = jax.ops.segment_sum(loss_mask_BT.reshape(-1), ids, num_segments=B * (T + 1))
    return logp.reshape(B, T + 1), count.reshape(B, T + 1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
             label_smoothing: float = 0.0, valid=None):
    """``(loss_sum, stats)`` over pairs (any shape; ``valid`` masks real pairs). ``stats`` holds
    sums (divide by the pair count): loss, chosen/rejected rewards, margin, accuracy, log-probs."""
    valid = jnp.ones_like(policy_chosen) if valid is None else valid.astype(policy_chosen.dtype)
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
    total = lambda x: jnp.sum(x * valid)  # noqa: E731
    stats = {"loss": total(losses), "rewards_chosen": total(chosen_reward),
             "rewards_rejected": total(rejected_reward), "rewards_margin": total(h),
             "rewards_accuracy": total((chosen_reward > rejected_reward).astype(h.dtype)),
             "logps_chosen": total(policy_chosen), "logps_rejected": total(policy_rejected),
             "pairs": jnp.sum(valid)}
    return stats["loss"], stats


# ------------------------------------------------------------------------------ model → log-probs
def pair_logps(model, batch):
    """Policy log-probs ``(chosen_BS, rejected_BS, valid_BS)`` with one forward over 2B rows."""
    both = {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]]) for k in S.BATCH_KEYS}
    out = model.forward(both["input_ids"], positions=both["positions"], segment_ids=both["segment_ids"])
    logp, count = segment_logps(out.logits, both["targets"], both["loss_mask"].astype(jnp.float32),
                                both["segment_ids"])
    B = batch["chosen_input_ids"].shape[0]
    valid = (count[:B] > 0) & (count[B:] > 0)
    valid = valid.at[:, 0].set(False)                       # slot 0 is padding
    return logp[:B], logp[B:], valid, out.aux_loss.astype(jnp.float32)


def reference_params(params, mode: str):
    """What to merge as the reference's trainable state: zeroed adapters (LoRA) or ``params``."""
    if mode == "adapters_off":
        return jax.tree.map(jnp.zeros_like, params)
    return params


def dpo_objective(params, rngs, frozen, ref, batch, n_pairs, *, graphdef, beta, label_smoothing,
                  aux_coef, n_micro, reference):
    rngs = jax.tree.map(lambda x: x, rngs)
    policy = nnx.merge(graphdef, params, rngs, frozen)
    pc, pr, valid, aux = pair_logps(policy, batch)
    ref_model = nnx.merge(graphdef, reference_params(params if reference == "adapters_off" else ref,
                                                     reference), rngs, frozen)
    ref_model = nnx.view(ref_model, deterministic=True, raise_if_not_found=False)
    rc, rr, _, _ = pair_logps(ref_model, batch)
    rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    loss_sum, stats = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing, valid=valid)
    objective = loss_sum / n_pairs + aux_coef * aux / n_micro
    return objective, (stats, nnx.state(policy, nnx.RngState))


def dpo_train_step(state: S.TrainState, frozen, ref, batch, *, graphdef, tx, schedule,
                   grad_accum: int = 1, beta: float = 0.1, label_smoothing: float = 0.0,
                   aux_coef: float = 0.0, reference: str = "adapters_off"):
    """One optimizer step on a batch of preference pairs; returns ``(state, metrics)``."""
    B = batch["chosen_input_ids"].shape[0]
    # pairs in the whole batch (the normaliser of every micro-batch's loss)
    counts = {p: jax.vmap(lambda s, m: jax.ops.segment_sum(m, s, num_segments=s.shape[0] + 1))(
        batch[p + "segment_ids"], batch[p + "loss_mask"].astype(jnp.float32)) for p in ("chosen_", "rejected_")}
    n_pairs = jnp.maximum(jnp.sum(((counts["chosen_"] > 0) & (counts["rejected_"] > 0))[:, 1:]), 1.0)
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, B // grad_accum, *x.shape[1:]),
                         {k: batch[k] for k in PAIR_KEYS})
    grad_fn = jax.grad(functools.partial(dpo_objective, graphdef=graphdef, beta=beta,
                                         label_smoothing=label_smoothing, aux_coef=aux_coef,
                                         n_micro=grad_accum, reference=reference), has_aux=True)

    def one_micro(carry, mb):
        grads_acc, rngs, stats_acc = carry
        grads, (stats, rngs) = grad_fn(state.params, rngs, frozen, ref, mb, n_pairs)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        stats_acc = jax.tree.map(lambda a, s: a + s, stats_acc, stats)
        return (grads_acc, rngs, stats_acc), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    stat_zeros = {k: jnp.zeros((), jnp.float32) for k in (
        "loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy",
        "logps_chosen", "logps_rejected", "pairs")}
    init = (zeros, state.rngs, stat_zeros)
    if grad_accum == 1:
        (grads, rngs, stats), _ = one_micro(init, jax.tree.map(lambda x: x[0], micro))
    else:
        (grads, rngs, stats), _ = jax.lax.scan(one_micro, init, micro)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = mean_stats(stats)
    metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step),
                   tokens=jnp.sum(batch["chosen_loss_mask"]) + jnp.sum(batch["rejected_loss_mask"]))
    return S.TrainState(state.step + 1, params, opt_state, rngs), metrics


def mean_stats(stats):
    pairs = jnp.maximum(stats["pairs"], 1.0)
    return {k: (v if k == "pairs" else v / pairs) for k, v in stats.items()}


def dpo_eval(params, rngs, frozen, ref, batch, *, graphdef, beta, label_smoothing, reference):
    """Summed DPO stats on a batch (no update, dropout off)."""
    policy = nnx.view(nnx.merge(graphdef, params, rngs, frozen), deterministic=True,
                      raise_if_not_found=False)
    ref_model = nnx.view(nnx.merge(graphdef, reference_params(
        params if reference == "adapters_off" else ref, reference), rngs, frozen),
        deterministic=True, raise_if_not_found=False)
    pc, pr, valid, _ = pair_logps(policy, batch)
    rc, rr, _, _ = pair_logps(ref_model, batch)
    return dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing, valid=valid)[1]


def resolve_reference(mode: str, lora: bool) -> str:
    if mode == "auto":
        return "adapters_off" if lora else "frozen_copy"
    if mode == "adapters_off" and not lora:
        raise ValueError("dpo.reference=adapters_off needs lora.enabled=true (full fine-tuning "
                         "has no adapters to switch off; use frozen_copy)")
    return "adapters_off" if lora else mode


# ------------------------------------------------------------------------------ trainer
class DpoTrainer(Trainer):
    """The loop's Trainer with a preference objective: same checkpoints, resume and export."""

    def __init__(self, cfg, model, tokenizer, *, show_bar: bool = True):
        from medjax.data import make_dataset
        from medjax.lora import apply_lora
        from medjax.sharding import make_mesh, rules_for
        from medjax.training.checkpoint import Checkpointer
        from medjax.training.optimizer import make_optimizer
        if cfg.data.format != "preference":
            raise ValueError(f"train.objective=dpo needs data.format=preference, got {cfg.data.format!r}")
        if tokenizer is None:
            raise ValueError("DPO needs a tokenizer: set model.path to a model directory with one")
        self.cfg, self.tokenizer, self.show_bar, self.start_step = cfg, tokenizer, show_bar, 0
        self.out_dir = Path(cfg.train.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.lora = cfg.lora.enabled
        self.reference = resolve_reference(cfg.dpo.reference, self.lora)
        if self.lora:
            apply_lora(model, cfg.lora, seed=cfg.train.seed)
            if cfg.lora.quantize:
                from medjax.quant import quantize_model
                print(quantize_model(model, cfg.lora.quantize, block=cfg.lora.quant_block,
                                     double_quant=cfg.lora.double_quant).summary())
        self.steps = cfg.train.steps
        self.tx, self.schedule = make_optimizer(cfg.optim, self.steps)
        self.graphdef, params, rngs, frozen = S.split_model(model, self.lora)
        self.mesh, self.rules = make_mesh(cfg.mesh), rules_for(cfg.mesh.preset)
        state = S.init_train_state(params, rngs, self.tx)
        self.state_sh = S.tree_shardings(state, self.mesh, self.rules)
        frozen_sh = S.tree_shardings(frozen, self.mesh, self.rules)
        # a separate buffer: the train state is donated every step, the reference never is
        ref = jax.tree.map(jnp.copy, params) if self.reference == "frozen_copy" else {}
        ref_sh = self.state_sh.params if self.reference == "frozen_copy" else {}
        self.state, self.frozen = S.place(state, self.state_sh), S.place(frozen, frozen_sh)
        self.ref = S.place(ref, ref_sh) if ref else {}
        from medjax.sharding import batch_sharding
        batch_sh = {k: batch_sharding(self.mesh) for k in PAIR_KEYS}
        kw = dict(graphdef=self.graphdef, beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing,
                  reference=self.reference)
        self.step_fn = jax.jit(
            functools.partial(dpo_train_step, tx=self.tx, schedule=self.schedule,
                              grad_accum=cfg.train.grad_accum, aux_coef=cfg.train.aux_loss_coef, **kw),
            in_shardings=(self.state_sh, frozen_sh, ref_sh, batch_sh), donate_argnums=(0,))
        self.eval_fn = jax.jit(functools.partial(dpo_eval, **kw))
        self.batches = make_dataset(cfg.data, tokenizer, batch_size=cfg.train.batch_size)
        if cfg.data.eval is not None:
            held = make_dataset(cfg.data, tokenizer, batch_size=cfg.train.batch_size, split="eval")
        else:   # no held-out file: the first batches of another shuffle of the train data
            held = make_dataset(cfg.data, tokenizer, batch_size=cfg.train.batch_size, seed=cfg.data.seed + 1)
        self.heldout = [b for _, b in zip(range(cfg.train.eval_batches), held)]
        self.heldout_is_train = cfg.data.eval is None
        ckpt_dir = cfg.checkpoint.dir or self.out_dir / "checkpoints"
        self.ckpt = Checkpointer(ckpt_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                                 async_save=cfg.checkpoint.async_save)

    def heldout_stats(self) -> dict:
        total = None
        for b in self.heldout:
            s = self.eval_fn(self.state.params, self.state.rngs, self.frozen, self.ref, _pair_batch(b))
            total = s if total is None else jax.tree.map(jnp.add, total, s)
        return {k: float(v) for k, v in mean_stats(total).items()} if total else {}

    def train(self) -> dict:
        from medjax.training.metrics import MetricsLogger, plot_run
        first = self.heldout[0] if self.heldout else None
        if first is not None and not (np.asarray(first["chosen_loss_mask"]).any()
                                      and np.asarray(first["rejected_loss_mask"]).any()):
            raise ValueError(f"no preference pair keeps an answer token within data.seq_len="
                             f"{self.cfg.data.seq_len} (prompts too long?): DPO would learn nothing")
        log = MetricsLogger(self.out_dir, total_steps=self.steps, start_step=self.start_step,
                            show_bar=self.show_bar)
        summary = {"steps": self.steps, "start_step": self.start_step, "objective": "dpo",
                   "reference": self.reference, "heldout_is_train_data": self.heldout_is_train}
        try:
            summary["heldout_before"] = before = self.heldout_stats()
            if before:
                log.log(self.start_step, before, kind="eval")
            t0, last = time.perf_counter(), {}
            for step in range(self.start_step, self.steps):
                batch_id = self.batches.get_state()
                self.state, metrics = self.step_fn(self.state, self.frozen, self.ref,
                                                   _pair_batch(next(self.batches)))
                metrics = {k: float(v) for k, v in metrics.items()}
                if not all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm")):
                    from medjax.training.loop import TrainingDiverged
                    raise TrainingDiverged(f"non-finite DPO loss {metrics['loss']} at step {step + 1}, "
                                           f"batch {json.dumps(batch_id, default=str)}")
                last = log.step(step + 1, metrics, metrics["tokens"])
                if (step + 1) % self.cfg.train.log_every == 0 or step + 1 == self.steps:
                    log.log(step + 1, last)
                if self.ckpt.should_save(step + 1) or step + 1 == self.steps:
                    self.save(step + 1)
            self.ckpt.wait()
            summary.update(train_seconds=round(time.perf_counter() - t0, 2),
                           final_train_loss=last.get("loss"))
            summary["heldout_after"] = after = self.heldout_stats()
            if after:
                log.log(self.steps, after, kind="eval")
            summary["heldout_loss_before"] = before.get("loss")
            summary["heldout_loss_after"] = after.get("loss")
        finally:
            log.close()
            self.ckpt.close()
        summary["plot"] = str(plot_run(log.jsonl_path, self.out_dir / "loss_lr.png"))
        return summary


def _pair_batch(batch) -> dict:
    return {k: jnp.asarray(batch[k]) for k in PAIR_KEYS}


def run_dpo(cfg, model, tokenizer, *, resume: bool = False, show_bar: bool = True):
    """``(summary, trainer)`` of a DPO run (the loop's ``run`` writes summary.json and exports)."""
    trainer = DpoTrainer(cfg, model, tokenizer, show_bar=show_bar)
    if resume and not trainer.resume():
        print(f"no checkpoint in {trainer.ckpt.directory}; starting from step 0")
    return trainer.train(), trainer
