"""Pipeline parallelism over the stacked layers (``mesh.stage``, ``train.pipeline_repeats``).

The scanned layer stack ``[L, ...]`` (models/stack.py) is cut into ``S · R`` blocks of
``L / (S · R)`` contiguous layers: block ``b = r · S + s`` runs on stage ``s`` in pass ``r``
(``R = 1``: GPipe, stage ``s`` runs layers ``[s · L/S, (s + 1) · L/S)``; ``R > 1``: the circular
schedule, each micro-batch goes round the stages ``R`` times). The ``M`` micro-batches are the
step's gradient-accumulation micro-batches; training has ``M ≥ S`` (an inference call with fewer
runs ``S`` slots, the missing micro-batches idle).

Stage order: the stack is split over the ``stage`` mesh axis in contiguous ``L / S`` slices, so
with ``R > 1`` the model holds its layers in STAGE ORDER, not in layer order: slice ``s`` holds
the blocks ``s, S + s, 2S + s, ...`` that stage ``s`` runs (:class:`LayerOrder`; the trainer keeps
its train state in that order for the whole run, and reorders at its boundaries only: the
initial load, checkpoints and the model it hands out, so checkpoints and exports do not depend
on ``S`` or ``R``). The ``[S, R, L/(R·S), ...]`` view of the stack is then a local reshape: no
weight moves between devices. With ``R = 1`` the two orders are the same.

One iteration ``t`` of a ``lax.scan`` over ``R · M + S − 1`` iterations runs every stage once,
side by side: ``jax.vmap`` over the stage axis of the weights ``[S, R, L/(R·S), ...]`` and of the
activations ``[S, B, T, H]``, both split over the ``stage`` mesh axis (``spmd_axis_name``), so
each device runs its own stage's layers on the weights it holds. Stage ``s`` works on pass
``k = t − s`` (micro-batch ``k mod M``, pass ``k // M``; idle when ``k`` is outside
``[0, R · M)``: the bubble, a fraction ``(S − 1) / (R · M + S − 1)`` of the iterations). After the
iteration the activations move one stage on, ``jnp.roll`` over the stage-split axis, which XLA
lowers to a collective-permute. Stage 0 reads its input from ``buffer [M, B, T, H]`` (the
embeddings at first); the last stage writes each micro-batch's output back into it, where
stage 0 finds it for the next pass (``M ≥ S`` guarantees it is written before it is read) and
where the head reads it after the last pass. The backward is the transpose of this loop
(``jax.grad`` through the scan): the same schedule in reverse, the same collective-permutes.

The per-layer body is models/stack.py's: every layer variable (weights, frozen LoRA bases,
quantized codes, adapters) is scanned within the stage, router statistics are summed per
micro-batch. Unlike the layer scan, the stages run on the fp32 masters, not on weights cast to
``model.dtype`` first (``stack.compute_weights(layers, None)``; each layer casts what it uses):
the backward of the scan over iterations sums every micro-batch's weight gradient into a
stacked carry of the weights' dtype, the pipeline's gradient accumulator. fp32, it adds the
micro-batches' gradients as the micro-batch loop without a pipeline does; bf16, it would round
every sum (tests/models/test_scan.py), for 4.0 GiB per chip less (Llama-2-70B, v5p-128,
R = 2, M = 16: 51.73 against 55.72 GiB, docs/SCALE.md).

With ``model.remat`` each layer is checkpointed with its policy AND each stage call is
checkpointed whole: all ``R · M + S − 1`` iterations are in flight before the backward
starts, so what is kept is one stage input per iteration (not one per layer), and the backward
recomputes a stage's layers (their inputs live for that stage only), one more forward pass.

Layer RNG streams (LoRA dropout) draw what the layer scan draws. There, each stream is drawn once
per layer call and its counter rides through the layers and the micro-batches: layer ``g`` of
micro-batch ``m`` draws with counter ``c + m · L + g`` (``c`` the counter at the step's start).
Here the stages run side by side, so each stage starts its layers from that counter, computed
from its pass (``m``, and the block ``r · S + s`` that gives ``g``): the same keys, so the same
dropout masks as the run without a pipeline, and the streams end the step at ``c + M · L``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from medjax.models.stack import compute_weights, layer_step, num_stacked
from medjax.ops.target import BATCH_AXES, context_mesh, settle

STAGE_AXIS = "stage"     # the mesh axis stages are split over (medjax.sharding.PIPELINE_AXIS)


def pick_repeat(w, r):
    """Block ``r`` of every ``[R, ...]`` leaf of ``w``."""
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, r, 0, keepdims=False), w)


def bubble_fraction(stages: int, repeats: int, micro_batches: int) -> float:
    """Idle share of the stage iterations: ``(S − 1) / (R · M + S − 1)``."""
    return (stages - 1) / (repeats * micro_batches + stages - 1)


def iterations(stages: int, repeats: int, micro_batches: int) -> int:
    return repeats * _slots(stages, repeats, micro_batches) + stages - 1


def _slots(stages: int, repeats: int, micro_batches: int) -> int:
    """Micro-batch slots of a pass: ``M``, or ``S`` when a circular schedule (``R > 1``) has fewer
    micro-batches than stages (an inference call: stage 0 must find a micro-batch's output of the
    previous pass in the buffer, written ``S − 1`` iterations after that pass left it)."""
    return micro_batches if repeats == 1 else max(micro_batches, stages)


@dataclasses.dataclass(frozen=True)
class LayerOrder:
    """The order a model's stacked ``[L, ...]`` variables hold their layers in: layer order
    (``repeats == 1``), or, with a circular schedule, STAGE ORDER (module docstring): position
    ``s · L/S + r · P + j`` holds layer ``(r · S + s) · P + j`` (``P = L / (S · R)``), stage ``s``'s
    blocks in its contiguous slice.

    :meth:`to_stages` / :meth:`to_logical` reorder every stacked leaf (``num_stacked``, leading
    dim ``num_layers``: weights, frozen bases, quantized codes, adapters, optimizer moments) of a
    tree of ``nnx.Variable``s and leave the rest; each leaf keeps its sharding. Identity with
    ``repeats == 1``."""
    stages: int = 1
    repeats: int = 1
    num_layers: int = 0

    def to_stages(self, tree, *, donate: bool = False):
        """``tree`` (layer order) in stage order; ``donate``: its stacked arrays are consumed."""
        return self._reorder(tree, self.repeats, self.stages, donate)

    def to_logical(self, tree):
        """``tree`` (stage order) in layer order, for checkpoints and the model handed out."""
        return self._reorder(tree, self.stages, self.repeats, False)

    def _reorder(self, tree, outer: int, inner: int, donate: bool):
        """Each stacked leaf reordered by its own program (donated: one leaf's copy at a time),
        each program settled before the next is dispatched. Dispatched together, their parts on
        XLA:CPU's one-thread-per-device pool were queued device by device as each device
        finished the train step, interleaved, and deadlocked waiting for peers that could not
        get a thread (XLA aborts the process after 40 s; seen under load in
        tests/distributed/test_pipeline.py; ``ops.target.settle``)."""
        if self.repeats == 1:
            return tree

        def one(v):
            if not (isinstance(v, nnx.Variable) and num_stacked(v)):
                return v
            x = v.get_value()
            if not isinstance(x, jax.Array) or x.ndim == 0 or x.shape[0] != self.num_layers:
                return v      # abstract, or an optimizer statistic without the layer axis
            swap = _swap_blocks_donated if donate else _swap_blocks
            return v.replace(settle(swap(x, outer, inner, x.sharding)))
        return jax.tree.map(one, tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _swap(x, outer: int, inner: int, sharding):
    """``[L, ...]`` viewed as ``[outer, inner, L/(outer·inner), ...]`` → its first two axes
    swapped, flattened back, on ``sharding``."""
    y = jnp.swapaxes(x.reshape(outer, inner, -1, *x.shape[1:]), 0, 1).reshape(x.shape)
    return jax.lax.with_sharding_constraint(y, sharding)


_swap_blocks = jax.jit(_swap, static_argnums=(1, 2, 3))
_swap_blocks_donated = jax.jit(_swap, static_argnums=(1, 2, 3), donate_argnums=0)


def _stage_mesh_axis(stages: int):
    """``"stage"`` when the context mesh splits ``stages`` over it, else None (one device runs
    every stage: the same numbers, no collectives)."""
    mesh = context_mesh()
    if mesh is None or STAGE_AXIS not in mesh.axis_names or mesh.shape[STAGE_AXIS] != stages:
        return None
    return STAGE_AXIS


def _constrain(x, axis, spec_of):
    """``x`` pinned to the layout ``spec_of(x)`` (mesh axes per dimension) when the stages are
    split over a mesh axis (``axis``), else ``x`` unchanged."""
    if axis is None:
        return x
    spec = jax.sharding.PartitionSpec(*spec_of(x))
    return jax.lax.with_sharding_constraint(x, spec)


def pipeline_layers(layers, h_MBTH, positions_MBT, inv_freq, segment_ids_MBT, *, stages: int,
                    repeats: int = 1, remat: bool = False, policy=None, kv=None):
    """Run the stacked ``layers`` over ``M`` micro-batches ``h_MBTH`` as an ``S``-stage pipeline.

    Returns ``(h_MBTH, kv, router_stats_M)``: each micro-batch's output of the last layer, the
    KV cache ``kv`` (``(k, v)``, each ``[L, M, B, S_max, Hkv, D]``, or None) with every layer's
    slots written, and each micro-batch's router statistics summed over the layers
    (``[M, ...]``): the values ``stack.scan_layers`` gives for each micro-batch on its own.
    Stage ``s`` holds the cache of the layers it runs (split over ``stage`` like the weights).
    """
    graphdef, rng_state, weights = compute_weights(layers, None)   # uncast: module docstring
    S, R, M = stages, repeats, h_MBTH.shape[0]
    L = jax.tree.leaves(weights)[0].shape[0]
    per = L // (S * R)
    axis = _stage_mesh_axis(S)
    mesh = context_mesh()
    rows = tuple(a for a in BATCH_AXES if mesh is not None and a in mesh.axis_names) or None
    if rows and h_MBTH.shape[1] % math.prod(mesh.shape[a] for a in rows):
        rows = None              # a micro-batch the batch axes cannot split: left to GSPMD
    unconstrained = jax.sharding.PartitionSpec.UNCONSTRAINED

    # [L, ...] in stage order (LayerOrder) → [S, R, per, ...], a local reshape: [s, r] is block
    # r·S + s, layers [(r·S + s)·per, ...), held by stage s
    blocks = jax.tree.map(lambda x: _constrain(
        x.reshape(S, R, per, *x.shape[1:]), axis,
        lambda y: (axis,) + (unconstrained,) * (y.ndim - 1)), weights)
    act = lambda y: (axis, rows) + (None,) * (y.ndim - 2)   # noqa: E731  [S, B, ...] activations
    micro = lambda y: (None, rows) + (None,) * (y.ndim - 2)  # noqa: E731  [M, B, ...] buffer
    row = lambda y: (rows,) + (None,) * (y.ndim - 1)          # noqa: E731  [B, ...] one slot
    cached = lambda y: (axis, None, None, None, rows) + (None,) * (y.ndim - 5)  # noqa: E731
    if kv is not None:   # [L, M, B, ...] → [S, R, per, M, B, ...], in the weights' order
        kv = jax.tree.map(lambda x: _constrain(x.reshape(S, R, per, *x.shape[1:]), axis, cached), kv)

    advanced = []        # set while tracing: did a layer draw from its RNG streams?

    def stage(w_R, r, h_BTH, positions_BT, segment_ids_BT, draws, kv_stage):
        """One stage's block ``r`` of its ``w_R [R, per, ...]`` on one micro-batch:
        ``(h_BTH, router_stats, kv_stage)`` (``kv_stage``: the layers' cache ``[per, B, ...]``
        or None); its RNG streams start ``draws`` draws after the step's (module docstring).
        With ``R > 1`` the block is picked here, inside the checkpointed stage (``model.remat``):
        picked outside, every iteration's block would be saved for the backward (Llama-2-7B on
        v5p-16, stage 4 x fsdp 2, M = 16: a 50.96 GiB peak, 26.08 with the pick inside). With
        ``R = 1`` it is a static slice (a dynamic one copies the stage's weights every
        iteration: Llama-2-70B on v5p-128, 60.88 GiB against 54.15)."""
        w = jax.tree.map(lambda x: x[0], w_R) if R == 1 else pick_repeat(w_R, r)
        body = layer_step(graphdef, positions_BT, inv_freq, segment_ids_BT, advanced,
                          remat=remat, policy=policy)
        (h_BTH, _), (kv_stage, stats) = jax.lax.scan(
            body, (h_BTH, moved_on(rng_state, draws)), (w, kv_stage))
        return h_BTH, jnp.sum(stats, axis=0), kv_stage
    if remat:   # keep each iteration's stage input only; the backward recomputes the stage
        stage = jax.checkpoint(stage, prevent_cse=False)

    def cache_of(c, r, m):       # one stage's [R, per, M, B, ...] → [per, B, ...] of (r, m)
        return jax.lax.dynamic_index_in_dim(pick_repeat(c, r), m, 1, keepdims=False)

    def cache_put(c, new, r, m, ok):
        new = jnp.where(ok, new, cache_of(c, r, m))
        return jax.lax.dynamic_update_slice(c, new[None, :, None], (r, 0, m) + (0,) * (c.ndim - 3))

    stage_ids = jnp.arange(S)
    has_segments = segment_ids_MBT is not None

    slots = _slots(S, R, M)

    def iteration(carry, t):
        state, buffer, stats_M, kv = carry
        k = t - stage_ids                              # [S] the pass each stage works on
        valid = (k >= 0) & (k < R * slots) & (k % slots < M)
        k = jnp.clip(k, 0, R * slots - 1)
        r, m = k // slots, jnp.minimum(k % slots, M - 1)
        first = jax.lax.dynamic_index_in_dim(buffer, jnp.minimum(t % slots, M - 1), 0,
                                             keepdims=False)
        state = _constrain(jnp.where((stage_ids == 0).reshape((S,) + (1,) * first.ndim),
                                     first[None], state), axis, act)
        seg = segment_ids_MBT[m] if has_segments else None
        draws = m * L + (r * S + stage_ids) * per      # layer scan's draws before this block
        kv_in = None if kv is None else jax.tree.map(lambda c: jax.vmap(
            cache_of, in_axes=(0, 0, 0), spmd_axis_name=axis)(c, r, m), kv)
        # stage s runs block r[s] · S + s: blocks[s, r[s]]
        out, stats, kv_out = jax.vmap(
            stage, in_axes=(0, 0, 0, 0, 0 if has_segments else None, 0, 0), spmd_axis_name=axis)(
                blocks, r, state, positions_MBT[m], seg, draws, kv_in)
        out = _constrain(out, axis, act)
        if kv is not None:
            kv = jax.tree.map(lambda c, new: _constrain(jax.vmap(
                cache_put, in_axes=(0, 0, 0, 0, 0), spmd_axis_name=axis)(
                    c, new, r, m, valid), axis, cached), kv, kv_out)
        last = m[S - 1]
        # the slot's old value and the last stage's output pinned to the buffer's row split:
        # unpinned, GSPMD gathered the whole [M, B, T, H] buffer over the batch axes every
        # iteration to read it (Llama-2-70B on v5p-128, stage 4 x fsdp 2, M = 16: an 8 GiB
        # all-gather at the step's peak, 54.27 GiB)
        kept = _constrain(jax.lax.dynamic_index_in_dim(buffer, last, 0, keepdims=False), axis, row)
        new = _constrain(jnp.where(valid[S - 1], out[S - 1], kept), axis, row)
        buffer = _constrain(jax.lax.dynamic_update_index_in_dim(buffer, new, last, 0), axis, micro)
        mask = valid.reshape((S,) + (1,) * (stats.ndim - 1))
        stats_M = stats_M.at[m].add(jnp.where(mask, stats, 0.0))
        return (jnp.roll(out, 1, axis=0), buffer, stats_M, kv), None

    state = _constrain(jnp.zeros((S,) + h_MBTH.shape[1:], h_MBTH.dtype), axis, act)
    stats_shape = jax.eval_shape(stage, jax.tree.map(lambda x: x[0], blocks), 0, h_MBTH[0],
                                 positions_MBT[0], segment_ids_MBT[0] if has_segments else None,
                                 jnp.zeros((), jnp.int32),
                                 None if kv is None else jax.tree.map(lambda c: c[0, 0, :, 0], kv))[1]
    stats_M = jnp.zeros((M,) + stats_shape.shape, jnp.float32)
    h_MBTH = _constrain(h_MBTH, axis, micro)
    (_, h_MBTH, stats_M, kv), _ = jax.lax.scan(iteration, (state, h_MBTH, stats_M, kv),
                                               jnp.arange(iterations(S, R, M)))
    if any(advanced):     # written back only when drawn from, as models/stack.scan_layers does
        nnx.update(layers, moved_on(rng_state, jnp.asarray(M * L, jnp.int32)))
    if kv is not None:
        kv = jax.tree.map(lambda c: c.reshape(L, *c.shape[3:]), kv)
    return h_MBTH, kv, stats_M


def moved_on(rng_state, draws):
    """``rng_state`` with every stream's counter ``draws`` further on (keys unchanged)."""
    return jax.tree.map(lambda v: v.replace(v.get_value() + draws.astype(v.get_value().dtype))
                        if isinstance(v, nnx.RngCount) else v, rng_state,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))
