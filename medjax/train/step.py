"""The pure training step: loss, gradient accumulation, clipping and the optimizer update.

The model is split once with ``nnx.split`` into a static ``graphdef`` and three states:

* ``params``  — the trainable variables (``nnx.LoRAParam`` for LoRA, every ``nnx.Param`` for
  full fine-tuning), kept in fp32: they are the master copy the optimizer updates;
* ``rngs``    — ``nnx.RngState`` (LoRA dropout streams), threaded through the step so dropout
  masks are reproducible and resumable;
* ``frozen``  — everything else (the base weights; bf16 allowed), never donated nor updated.

plus ``reference``: frozen arrays the objective needs beside the model (DPO's frozen copy), or
``{}``. ``train_step(state, frozen, reference, batch, *, graphdef, tx, schedule, objective, ...)``
is a module-level pure function; :func:`jit_train_step` jits it with explicit in/out shardings
and donates ``state``. The model computes in its own ``dtype`` (bf16 compute casts the fp32
master params inside each layer). ``training/setup.py`` builds all of this from a config.

What is minimised is the ``objective`` (``training/objectives.py``): every micro-batch's loss is
divided by the objective's normaliser over the WHOLE batch (loss tokens for the causal LM, pairs
for DPO), so ``grad_accum`` micro-batches give the same gradient as one big batch (up to
summation order).

Micro-batches are STRIDED (:func:`micro_batches`): micro-batch ``i`` holds rows ``i, i + A,
i + 2A, ...`` of the global batch (``A = grad_accum``). The batch's rows are split over the mesh's
``data × fsdp × expert`` axes in contiguous blocks, one per device, so every micro-batch takes
the same share of every device's block and no row crosses devices (a contiguous split would put
micro-batch ``i`` on a few devices and make XLA move rows between them every step). Which rows
go together changes nothing in the summed loss and gradient; it does decide which LoRA dropout
mask / NEFTune noise a row draws and what Mixtral's per-micro-batch router aux loss sees. A
DPO pair is row ``r`` of every ``chosen_*`` and ``rejected_*`` array, so pairs stay together.

Pipelined (``mesh.stage > 1``): the objective's loss takes all micro-batches at once
(``[grad_accum, B / grad_accum, ...]`` arrays), the decoder runs them through its pipeline
(models/pipeline.py) and ONE gradient of the summed loss replaces the scan of per-micro-batch
gradients: the same sum, the micro-batches in flight together on different stages.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from medjax.ops.target import compiler_options

from medjax.train.objectives import LM_KEYS as BATCH_KEYS  # noqa: F401  (the causal LM's batch)


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


# ------------------------------------------------------------------------------ step
def micro_batches(batch, grad_accum: int):
    """``[B, ...]`` arrays → ``[grad_accum, B / grad_accum, ...]``, micro-batch ``i`` = rows
    ``i::grad_accum`` (strided: each device's contiguous block of rows gives every micro-batch
    its equal share, see the module docstring). Under a multi-device context mesh whose batch
    shards divide a micro-batch, the micro-batch rows are pinned to the batch axes."""
    from medjax.ops.target import context_mesh
    from medjax.ops.target import BATCH_AXES

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1)
    micro = jax.tree.map(split, batch)
    mesh = context_mesh()
    if mesh is None or grad_accum == 1:
        return micro
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
    spec = jax.sharding.PartitionSpec(None, tuple(a for a in BATCH_AXES if a in mesh.shape))
    return jax.tree.map(lambda x: x if x.shape[1] % shards else jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(mesh, spec)), micro)


def accumulate_grads(params, rngs, frozen, reference, batch, *, graphdef, objective, grad_accum: int,
                     pipelined: bool = False):
    """Gradients of ``objective`` over the batch, summed over ``grad_accum`` micro-batches
    (``lax.scan``; with ``pipelined`` one gradient of the loss of all micro-batches, run through
    the decoder's pipeline); each micro-batch's loss is divided by ``objective.normalizer`` of the
    WHOLE batch. Returns ``(grads, rngs, metrics)`` with ``objective.metrics`` of the summed stats."""
    norm = objective.normalizer(batch)
    micro = micro_batches({k: batch[k] for k in objective.batch_keys}, grad_accum)
    grad_fn = jax.grad(functools.partial(objective.loss, graphdef=graphdef, n_micro=grad_accum),
                       has_aux=True)
    if pipelined:
        grads, (stats, rngs) = grad_fn(params, rngs, frozen, reference, micro, norm)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return grads, rngs, objective.metrics(stats, grad_accum)

    def one_micro(carry, mb):
        grads_acc, rngs, stats_acc = carry
        grads, (stats, rngs) = grad_fn(params, rngs, frozen, reference, mb, norm)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        stats_acc = jax.tree.map(lambda a, s: a + s.astype(jnp.float32), stats_acc, stats)
        return (grads_acc, rngs, stats_acc), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    first = jax.tree.map(lambda x: x[0], micro)
    init = (zeros, rngs, {k: jnp.zeros((), jnp.float32) for k in objective.stat_names})
    if grad_accum == 1:
        (grads, rngs, stats), _ = one_micro(init, first)
    else:
        (grads, rngs, stats), _ = jax.lax.scan(one_micro, init, micro)
    return grads, rngs, objective.metrics(stats, grad_accum)


def train_step(state: TrainState, frozen, reference, batch, *, graphdef, tx, schedule, objective,
               grad_accum: int = 1, pipelined: bool = False):
    """One optimizer step over ``batch`` (dict of ``[B, T]`` arrays). Returns ``(state, metrics)``."""
    grads, rngs, metrics = accumulate_grads(state.params, state.rngs, frozen, reference, batch,
                                            graphdef=graphdef, objective=objective,
                                            grad_accum=grad_accum, pipelined=pipelined)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
    return TrainState(state.step + 1, params, opt_state, rngs), metrics


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


def on_mesh(mesh, fn, rules=None):
    """``fn`` traced with ``mesh`` as the context mesh and ``rules`` (default: those of the
    smallest preset that uses its axes) as the context's sharding rules: the attention dispatcher
    then runs its kernels (Mosaic / Triton custom calls, which GSPMD cannot partition) per device
    shard, and the MoE layer splits what the rules split over ``expert``."""
    from medjax.ops.target import logical_rules
    from medjax.sharding import preset_of, rules_for
    abstract = mesh if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.abstract_mesh
    table = (rules or rules_for(preset_of(abstract), stages=dict(abstract.shape).get("stage", 1))).table

    def traced(*args):
        with jax.sharding.use_abstract_mesh(abstract), logical_rules(table):
            return fn(*args)
    return traced


def jit_train_step(state, frozen, reference, *, mesh, rules, graphdef, tx, schedule, objective,
                   grad_accum, pipelined: bool = False):
    """``(step_fn, (state_sh, frozen_sh, reference_sh))``: ``step_fn(state, frozen, reference, batch)``
    is ``train_step`` jitted with explicit shardings and ``state`` donated (``frozen`` and the
    objective's ``reference`` never are)."""
    from medjax.sharding import batch_sharding
    shardings = (tree_shardings(state, mesh, rules), tree_shardings(frozen, mesh, rules),
                 tree_shardings(reference, mesh, rules))
    batch_sh = {k: batch_sharding(mesh) for k in objective.batch_keys}
    fn = on_mesh(mesh, functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                                         objective=objective, grad_accum=grad_accum,
                                         pipelined=pipelined), rules)
    step_fn = jax.jit(fn, in_shardings=(*shardings, batch_sh),
                      out_shardings=(shardings[0], _replicated(mesh)), donate_argnums=(0,),
                      compiler_options=compiler_options(mesh))
    return step_fn, shardings


def jit_eval_stats(params_sh, rngs_sh, frozen_sh, reference_sh, *, mesh, graphdef, objective):
    """``eval_fn(params, rngs, frozen, reference, batch) -> objective.eval_stats`` (sums), jitted
    with the train state's shardings."""
    from medjax.sharding import batch_sharding
    batch_sh = {k: batch_sharding(mesh) for k in objective.batch_keys}
    return jax.jit(on_mesh(mesh, functools.partial(objective.eval_stats, graphdef=graphdef)),
                   in_shardings=(params_sh, rngs_sh, frozen_sh, reference_sh, batch_sh),
                   out_shardings=_replicated(mesh), compiler_options=compiler_options(mesh))
