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
