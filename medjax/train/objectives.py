"""What a training run minimises: an objective is a loss, not a trainer.

An objective (a frozen, hashable dataclass: a static argument of the jitted step) declares

* ``batch_keys``   — the arrays it reads from a data batch;
* ``normalizer(batch)`` — the count every micro-batch's loss is divided by (loss tokens of the
  WHOLE batch for the causal LM, preference pairs for DPO), so ``grad_accum`` micro-batches give
  the gradient of one big batch;
* ``stat_names`` — the scalar sums ``loss`` returns per micro-batch;
* ``loss(params, rngs, frozen, reference, batch, norm, *, graphdef, n_micro)`` —
  ``(objective, (stats, new_rngs))`` for one micro-batch, ``stats`` a dict of sums;
* ``metrics(stats, n_micro)`` — the logged train metrics from the stats summed over micro-batches
  (always ``loss`` and ``tokens``);
* ``eval_stats(params, rngs, frozen, reference, batch, *, graphdef)`` / ``eval_metrics(stats)`` —
  held-out evaluation (dropout and NEFTune off), ``loss`` included;
* ``initial_reference(params)`` — frozen arrays the objective needs besides the model (DPO's
  frozen copy of the initial weights), ``{}`` otherwise; never updated, never donated.

One loop (``training/loop.py``'s ``Trainer``) runs any objective: checkpoints, preemption,
skip-nonfinite, epochs, NEFTune, held-out eval and export are the loop's, for all of them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from medjax.errors import DataError
from medjax.train import dpo
from medjax.train.neftune import noisy_embeddings

LM_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")
PAIR_KEYS = tuple(p + k for p in ("chosen_", "rejected_") for k in LM_KEYS)


def _training_model(graphdef, params, rngs, frozen):
    # Rebuild the RNG variables at this trace level so dropout / NEFTune may advance their counters.
    return nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rngs), frozen)


def _eval_model(graphdef, params, rngs, frozen):
    # RNG variables rebuilt at this trace level too: a rematerialised layer writes its RNG state
    # back even when dropout is off (DPO's reference runs inside the policy's grad and scan)
    return nnx.view(nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rngs), frozen),
                    deterministic=True, raise_if_not_found=False)


@dataclasses.dataclass(frozen=True)
class CausalLM:
    """Next-token NLL on ``loss_mask`` tokens (+ ``aux_coef`` × Mixtral router loss), NEFTune
    noise on the input embeddings when attached. The head and its NLL run chunk by chunk
    (``Decoder.token_nll``): no ``[B, T, V]`` logits in training or held-out evaluation."""
    aux_coef: float = 0.0
    name = "causal_lm"
    batch_keys = LM_KEYS
    stat_names = ("nll_sum", "aux_loss", "tokens")

    def initial_reference(self, params):
        return {}

    def normalizer(self, batch):
        return jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def loss(self, params, rngs, frozen, reference, batch, norm, *, graphdef, n_micro):
        model = _training_model(graphdef, params, rngs, frozen)
        out = model.forward(batch["input_ids"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"],
                            input_embeds=noisy_embeddings(model, batch), head=False)
        mask_BT = batch["loss_mask"].astype(jnp.float32)
        nll_sum = jnp.sum(model.token_nll(out.hidden, batch["targets"]) * mask_BT)
        aux = out.aux_loss.astype(jnp.float32)
        objective = nll_sum / norm + self.aux_coef * aux / n_micro
        stats = {"nll_sum": nll_sum, "aux_loss": aux, "tokens": jnp.sum(mask_BT)}
        return objective, (stats, nnx.state(model, nnx.RngState))

    def metrics(self, stats, n_micro):
        tokens = stats["tokens"]
        return {"loss": stats["nll_sum"] / jnp.maximum(tokens, 1.0),
                "aux_loss": stats["aux_loss"] / n_micro, "tokens": tokens}

    def eval_stats(self, params, rngs, frozen, reference, batch, *, graphdef):
        model = _eval_model(graphdef, params, rngs, frozen)
        hidden = model.forward(batch["input_ids"], positions=batch["positions"],
                               segment_ids=batch["segment_ids"], head=False).hidden
        mask_BT = batch["loss_mask"].astype(jnp.float32)
        return {"nll_sum": jnp.sum(model.token_nll(hidden, batch["targets"]) * mask_BT),
                "tokens": jnp.sum(mask_BT)}

    def eval_metrics(self, stats):
        return {"loss": stats["nll_sum"] / jnp.maximum(stats["tokens"], 1.0)}

    def check_batch(self, batch) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class DPO:
    """Direct preference optimisation (``training/dpo.py`` has the formula) against a reference
    that is the policy with its adapters switched off (``adapters_off``: LoRA, no second copy)
    or a frozen copy of the initial trainable weights (``frozen_copy``)."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_mode: str = "adapters_off"
    aux_coef: float = 0.0
    name = "dpo"
    batch_keys = PAIR_KEYS
    stat_names = ("loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy",
                  "logps_chosen", "logps_rejected", "pairs", "tokens")

    def initial_reference(self, params):
        # a separate buffer: the train state is donated every step, the reference never is
        return jax.tree.map(jnp.copy, params) if self.reference_mode == "frozen_copy" else {}

    def normalizer(self, batch):
        counts = {p: jax.vmap(lambda s, m: jax.ops.segment_sum(m, s, num_segments=s.shape[0] + 1))(
            batch[p + "segment_ids"], batch[p + "loss_mask"].astype(jnp.float32))
            for p in ("chosen_", "rejected_")}
        return jnp.maximum(jnp.sum(((counts["chosen_"] > 0) & (counts["rejected_"] > 0))[:, 1:]), 1.0)

    def _reference_model(self, graphdef, params, rngs, frozen, reference):
        ref_params = (jax.tree.map(jnp.zeros_like, params) if self.reference_mode == "adapters_off"
                      else reference)
        return _eval_model(graphdef, ref_params, rngs, frozen)

    def _pair_stats(self, policy, ref_model, batch):
        pc, pr, valid, aux = dpo.pair_logps(policy, batch)
        rc, rr, _, _ = dpo.pair_logps(ref_model, batch)
        rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
        loss_sum, stats = dpo.dpo_loss(pc, pr, rc, rr, beta=self.beta,
                                       label_smoothing=self.label_smoothing, valid=valid)
        return loss_sum, stats, aux

    def loss(self, params, rngs, frozen, reference, batch, norm, *, graphdef, n_micro):
        policy = _training_model(graphdef, params, rngs, frozen)
        ref_model = self._reference_model(graphdef, params, rngs, frozen, reference)
        loss_sum, stats, aux = self._pair_stats(policy, ref_model, batch)
        stats["tokens"] = (jnp.sum(batch["chosen_loss_mask"].astype(jnp.float32))
                           + jnp.sum(batch["rejected_loss_mask"].astype(jnp.float32)))
        objective = loss_sum / norm + self.aux_coef * aux / n_micro
        return objective, (stats, nnx.state(policy, nnx.RngState))

    def metrics(self, stats, n_micro):
        return dpo.mean_stats(stats)

    def eval_stats(self, params, rngs, frozen, reference, batch, *, graphdef):
        policy = _eval_model(graphdef, params, rngs, frozen)
        ref_model = self._reference_model(graphdef, params, rngs, frozen, reference)
        return self._pair_stats(policy, ref_model, batch)[1]

    def eval_metrics(self, stats):
        return dpo.mean_stats(stats)

    def check_batch(self, batch) -> None:
        """A batch where no pair keeps an answer token teaches nothing: say so up front. ``batch``
        is a global batch (jax arrays across processes: every process calls this, a collective)."""
        if not (bool(jnp.any(batch["chosen_loss_mask"])) and bool(jnp.any(batch["rejected_loss_mask"]))):
            raise DataError("no preference pair keeps an answer token within data.seq_len "
                             "(prompts too long?): DPO would learn nothing")


def objective_for(cfg):
    """The objective ``cfg.train.objective`` names (``sft`` → :class:`CausalLM`, ``dpo`` → :class:`DPO`)."""
    if cfg.train.objective == "dpo":           # RunConfig checked data.format=preference
        return DPO(beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing,
                   reference_mode=dpo.resolve_reference(cfg.dpo.reference, cfg.lora.enabled),
                   aux_coef=cfg.train.aux_loss_coef)
    return CausalLM(aux_coef=cfg.train.aux_loss_coef)
