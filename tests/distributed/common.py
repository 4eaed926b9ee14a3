"""Shared pieces of the multi-device / multi-process checks: a tiny model, a loss and a pure,
sharded AdamW train step (jax.jit over nnx.split state with explicit in/out shardings)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medjax.models import get_preset, init_decoder

LR = 1e-3
SEQ = 16


def build(preset: str, seed: int = 0):
    """(graphdef, state) of ``(model, optimizer)`` for a tiny preset, on the default device."""
    model = init_decoder(get_preset(preset), seed=seed)
    optimizer = nnx.Optimizer(model, optax.adamw(LR, weight_decay=0.01), wrt=nnx.Param)
    return nnx.split((model, optimizer))


def loss_fn(model, tokens_BT):
    out = model.forward(tokens_BT[:, :-1])
    logp_BTV = jax.nn.log_softmax(out.logits, axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(nll_BT) + model.config.router_aux_loss_coef * out.aux_loss


def train_step(graphdef, state, tokens_BT):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens_BT)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss


def jit_step(graphdef, state_shardings=None, batch_sharding=None):
    step = functools.partial(train_step, graphdef)
    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def batches(num_steps: int, batch: int, vocab: int, seed: int = 1):
    """Deterministic global batches of random token ids, ``[batch, SEQ + 1]`` each."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=(batch, SEQ + 1), dtype=np.int32) for _ in range(num_steps)]


# ----------------------------------------------------------------------------- medjax.train
def training_setup(preset: str, mesh, rules, seed: int = 0, scan_layers: bool = False):
    """The project's own jitted train step (medjax.train.step) on ``mesh``.

    Returns ``(step_fn, state, frozen)``; ``step_fn(state, frozen, batch) -> (state, metrics)``.
    """
    from medjax.config import OptimSection
    from medjax.sharding import place
    from medjax.train.objectives import CausalLM
    from medjax.train.optimizer import make_optimizer
    from medjax.train.step import init_train_state, jit_train_step, split_model

    model = init_decoder(get_preset(preset), seed=seed, scan_layers=scan_layers)
    graphdef, params, rngs, frozen = split_model(model, lora=False)
    tx, schedule = make_optimizer(OptimSection(lr=LR, schedule="constant", weight_decay=0.01,
                                               clip_norm=1.0), total_steps=100)
    state = init_train_state(params, rngs, tx)
    step, (state_sh, frozen_sh, _) = jit_train_step(
        state, frozen, {}, mesh=mesh, rules=rules, graphdef=graphdef, tx=tx, schedule=schedule,
        grad_accum=1, objective=CausalLM(aux_coef=get_preset(preset).router_aux_loss_coef))
    return (lambda state, frozen, batch: step(state, frozen, {}, batch),
            place(state, state_sh), place(frozen, frozen_sh))


def lm_batch(tokens_BT1):
    """The training step's batch dict from ``[B, T+1]`` token ids (one unpacked row each)."""
    B, T1 = tokens_BT1.shape
    T = T1 - 1
    return {"input_ids": tokens_BT1[:, :-1], "targets": tokens_BT1[:, 1:],
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}
