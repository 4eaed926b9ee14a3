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
computed in the same step without gradient. The objective that wires this into the one
training loop is ``objectives.DPO``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medjax.errors import ConfigError
from medjax.train.neftune import noisy_embeddings

LM_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")


# ------------------------------------------------------------------------------ formula
def segment_logps(token_logp_BT, loss_mask_BT, segment_ids_BT):
    """``(logp_BS, count_BS)``: summed answer log-probs (``token_logp_BT``, each token's
    log-probability of its target) and answer-token counts per (row, segment id); ``S = T + 1``
    slots, slot 0 = padding."""
    B, T = segment_ids_BT.shape
    ids = (jnp.arange(B)[:, None] * (T + 1) + segment_ids_BT).reshape(-1)
    logp = jax.ops.segment_sum((token_logp_BT * loss_mask_BT).reshape(-1), ids,
                               num_segments=B * (T + 1))
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
    """Policy log-probs ``(chosen_BS, rejected_BS, valid_BS, aux_loss)`` with one forward over
    2B rows (NEFTune noise on the embeddings when the model has it on: training only).
    Micro-batched ``[M, B, T]`` arrays (the pipeline) give ``[M, B, S]`` results."""
    both = {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]], axis=-2)
            for k in LM_KEYS}
    out = model.forward(both["input_ids"], positions=both["positions"], segment_ids=both["segment_ids"],
                        input_embeds=noisy_embeddings(model, both), head=False)
    token_logp = -model.token_nll(out.hidden, both["targets"])       # [..., 2B, T], chunked head
    lead, T = both["targets"].shape[:-1], both["targets"].shape[-1]
    rows = lambda x: x.reshape(-1, *x.shape[len(lead):])    # noqa: E731  [..., 2B, T] → [rows, T]
    logp, count = segment_logps(rows(token_logp), rows(both["loss_mask"].astype(jnp.float32)),
                                rows(both["segment_ids"]))
    logp, count = logp.reshape(*lead, T + 1), count.reshape(*lead, T + 1)
    B = batch["chosen_input_ids"].shape[-2]
    valid = (count[..., :B, :] > 0) & (count[..., B:, :] > 0)
    valid = valid.at[..., 0].set(False)                     # slot 0 is padding
    return logp[..., :B, :], logp[..., B:, :], valid, out.aux_loss.astype(jnp.float32)


def mean_stats(stats):
    """Per-pair means of summed stats (``pairs`` and ``tokens`` stay counts)."""
    pairs = jnp.maximum(stats["pairs"], 1.0)
    return {k: (v if k in ("pairs", "tokens") else v / pairs) for k, v in stats.items()}


def resolve_reference(mode: str, lora: bool) -> str:
    if mode == "auto":
        return "adapters_off" if lora else "frozen_copy"
    if mode == "adapters_off" and not lora:
        raise ConfigError("dpo.reference=adapters_off needs lora.enabled=true (full fine-tuning "
                         "has no adapters to switch off; use frozen_copy)")
    return "adapters_off" if lora else mode
