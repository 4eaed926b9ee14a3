"""The pure training step: loss, gradient accumulation, clipping and the optimizer update.

The model is split once with ``nnx.split`` into a static ``graphdef`` and three states:

* ``params``  — the trainable variables (``nnx.LoRAParam`` for LoRA, every ``nnx.Param`` for
  full fine-tuning), kept in fp32: they are the master copy the optimizer updates;
* ``rngs``    — ``nnx.RngState`` (LoRA dropout streams), threaded through the step so dropout
  masks are reproducible and resumable;
* ``frozen``  — everything else (the base weights; bf16 allowed), never donated nor updated.

``train_step(state, frozen, batch, *, graphdef, tx, ...)`` is a module-level pure function;
:func:`jit_train_step` jits it with explicit in/out shardings and donates ``state``. The model
computes in its own ``dtype`` (bf16 compute casts the fp32 master params inside each layer).

The loss is token-weighted: every micro-batch contributes ``sum(nll * loss_mask) / N`` where
``N`` counts the loss tokens of the WHOLE batch, so ``grad_accum`` micro-batches give the same
gradient as one big batch (up to summation order).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from medjax.training.neftune import noisy_embeddings

BATCH_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")


class TrainState(NamedTuple):
    step: jax.Array          # int32 scalar: optimizer steps taken
    params: Any              # nnx.State of the trainable variables (fp32)
    opt_state: Any           # optax state over ``params``
    rngs: Any                # nnx.State of RngState variables (dropout), possibly empty


def trainable_filter(lora: bool):
    return nnx.LoRAParam if lora else nnx.Param


def split_model(model, lora: bool):
    """``(graphdef, params, rngs, frozen)``; ``nnx.merge(graphdef, params, rngs, frozen)`` rebuilds it."""
    return nnx.split(model, trainable_filter(lora), nnx.RngState, ...)


def init_train_state(params, rngs, tx) -> TrainState:
    params = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rngs=rngs)


# ------------------------------------------------------------------------------ loss
def token_nll(logits_BTV, targets_BT):
    """Per-token negative log-likelihood in fp32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)


def causal_lm_loss(params, rngs, frozen, batch, n_loss_tokens, *, graphdef, aux_coef, n_micro):
    """``(objective, (nll_sum, aux_loss, new_rngs))`` for one micro-batch."""
    # Rebuild the RNG variables at this trace level so dropout may advance their counters.
    rngs = jax.tree.map(lambda x: x, rngs)
    model = nnx.merge(graphdef, params, rngs, frozen)
    out = model.forward(batch["input_ids"], positions=batch["positions"],
                        segment_ids=batch["segment_ids"], input_embeds=noisy_embeddings(model, batch))
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    nll_sum = jnp.sum(token_nll(out.logits, batch["targets"]) * mask_BT)
    aux = out.aux_loss.astype(jnp.float32)
    objective = nll_sum / n_loss_tokens + aux_coef * aux / n_micro
    new_rngs = nnx.state(model, nnx.RngState)
    return objective, (nll_sum, aux, new_rngs)


def accumulate_grads(params, rngs, frozen, batch, *, graphdef, grad_accum: int, aux_coef: float):
    """Gradients of the batch objective summed over ``grad_accum`` micro-batches (``lax.scan``).

    Returns ``(grads, rngs, metrics)`` with metrics ``loss`` (mean token NLL), ``aux_loss``
    and ``tokens`` (loss tokens).
    """
    n_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    denom = jnp.maximum(n_tokens, 1.0)
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]),
                         {k: batch[k] for k in BATCH_KEYS})
    grad_fn = jax.grad(functools.partial(causal_lm_loss, graphdef=graphdef, aux_coef=aux_coef,
                                         n_micro=grad_accum), has_aux=True)

    def one_micro(carry, mb):
        grads_acc, rngs, nll_acc, aux_acc = carry
        grads, (nll_sum, aux, rngs) = grad_fn(params, rngs, frozen, mb, denom)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        return (grads_acc, rngs, nll_acc + nll_sum, aux_acc + aux), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (zeros, rngs, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    if grad_accum == 1:
        (grads, rngs, nll, aux), _ = one_micro(init, jax.tree.map(lambda x: x[0], micro))
    else:
        (grads, rngs, nll, aux), _ = jax.lax.scan(one_micro, init, micro)
    metrics = {"loss": nll / denom, "aux_loss": aux / grad_accum, "tokens": n_tokens}
    return grads, rngs, metrics


def train_step(state: TrainState, frozen, batch, *, graphdef, tx, schedule, grad_accum: int = 1,
               aux_coef: float = 0.0):
    """One optimizer step over ``batch`` (dict of ``[B, T]`` arrays). Returns ``(state, metrics)``."""
    grads, rngs, metrics = accumulate_grads(state.params, state.rngs, frozen, batch, graphdef=graphdef,
                                            grad_accum=grad_accum, aux_coef=aux_coef)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return TrainState(state.step + 1, params, opt_state, rngs), metrics


def eval_loss(params, rngs, frozen, batch, *, graphdef):
    """``(nll_sum, n_tokens)`` on a batch, dropout off."""
    model = nnx.merge(graphdef, params, rngs, frozen)
    model = nnx.view(model, deterministic=True, raise_if_not_found=False)
    logits = model.forward(batch["input_ids"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"]).logits
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(token_nll(logits, batch["targets"]) * mask_BT), jnp.sum(mask_BT)


# ------------------------------------------------------------------------------ jit + shardings
def _replicated(mesh):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def tree_shardings(tree, mesh, rules):
    """NamedShardings for any pytree holding ``nnx.Variable``s (params, optax states, ...)."""
    from medjax.sharding import _variable_sharding
    return jax.tree_util.tree_map_with_path(
        lambda path, v: (v.replace(_variable_sharding(path, v, mesh, rules))
                         if isinstance(v, nnx.Variable) else _replicated(mesh)),
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def jit_train_step(state, frozen, *, mesh, rules, graphdef, tx, schedule, grad_accum, aux_coef):
    """``(step_fn, state_shardings, frozen_shardings)``: ``step_fn(state, frozen, batch)``
    is ``train_step`` jitted with explicit shardings and ``state`` donated."""
    from medjax.sharding import batch_sharding
    state_sh = tree_shardings(state, mesh, rules)
    frozen_sh = tree_shardings(frozen, mesh, rules)
    batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                           grad_accum=grad_accum, aux_coef=aux_coef)
    step_fn = jax.jit(fn, in_shardings=(state_sh, frozen_sh, batch_sh),
                      out_shardings=(state_sh, _replicated(mesh)), donate_argnums=(0,))
    return step_fn, state_sh, frozen_sh


def jit_eval_loss(params_sh, rngs_sh, frozen_sh, *, mesh, graphdef):
    from medjax.sharding import batch_sharding
    batch_sh = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    return jax.jit(functools.partial(eval_loss, graphdef=graphdef),
                   in_shardings=(params_sh, rngs_sh, frozen_sh, batch_sh),
                   out_shardings=_replicated(mesh))


def place(tree, shardings):
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)
