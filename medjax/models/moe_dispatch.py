"""A ``SparseMoE`` layer's rows to their experts and back: on one device, or across the
``expert`` mesh axis.

:func:`moe_layer` routes (``SparseMoE.route``) and returns the weighted sum of each token's
experts plus the router statistics. Without a context mesh whose ``expert`` axis is > 1 it runs
:func:`dispatch_local`: (token, slot) rows sorted by expert, gathered straight into the grouped
matmul's block layout, the ``Experts`` module run on them, the results scattered back. When the
context mesh splits the batch over devices (data × fsdp), that runs per device under
``jax.shard_map`` on each device's own rows (a sort over the whole batch would make GSPMD gather
every token onto every device).

**Expert parallelism** (:func:`moe_layer_expert_parallel`). Under ``mesh.preset=fsdp_ep`` every
weight stacked over experts (logical axis ``experts``: base weights, LoRA adapters, quantized
codes and scales) is split over the ``expert`` mesh axis, and the batch is split over
``data × fsdp × expert``. The whole layer then runs under ``jax.shard_map`` over the context mesh
(``medjax.ops.target.context_mesh``, set by ``training.step.on_mesh``), each device on its own
tokens:

1. it routes them (router, LoRA / quantized router included; statistics summed afterwards) and
   sorts the (token, slot) rows by expert: the rows for device ``d`` (experts
   ``d·E/ep .. (d+1)·E/ep − 1``) are contiguous;
2. an ``all_to_all`` of the per-expert counts tells every device how many rows it receives from
   each sender for each of its local experts;
3. the rows travel with one all-to-all over ``expert`` into a receive buffer of ``ep`` slots of
   ``C`` rows (slot ``s`` = rows from sender ``s``, grouped by local expert);
4. the buffer is sorted by local expert into the block layout and the local experts run the
   same ``Experts.__call__`` / ``project`` as on one device (so LoRA / QLoRA wrappers work);
5. the results travel back with the reverse all-to-all and are combined as on one device.

**Dropless.** ``C = n · min(k, E/ep)`` for ``n`` tokens per device: a token's ``k`` experts are
distinct, so it sends at most ``min(k, E/ep)`` rows to one device, and no routing can overflow a
slot. The price is a receive buffer of ``ep · C`` rows (the grouped matmul's loop still runs only
over the blocks that hold rows).

**Transports.** ``"ragged"`` sends exactly the routed rows with ``jax.lax.ragged_all_to_all``
(``k · n · H`` elements per device each way). ``"padded"`` sends every slot whole with
``jax.lax.all_to_all`` (``ep · C · H`` elements per device each way). XLA:CPU (jax 0.10.2) has no
ragged-all-to-all, so CPU takes ``"padded"``; GPU and TPU take ``"ragged"`` (the platform of the
mesh's devices; ``medjax.ops.target.on_target`` stages both for a device-less mesh; a LoRA
dropout inside cannot run there). :func:`all_to_all_bytes`
gives the bytes per device and layer (the planner prints them per step).

**No weight gather over ``expert``.** Expert weights enter the ``shard_map`` split over
``expert`` and whole along their other dims: an fsdp-split ``embed`` dim is all-gathered over
``fsdp`` only, at the boundary, as GSPMD does for any fsdp weight (their gradients are summed
over ``data × fsdp`` the same way).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from medjax.ops.grouped_matmul import block_layout, default_block_rows, max_blocks
from medjax.ops.target import EXPERT_AXIS, context_mesh, mesh_axes_of, on_target, row_axes, \
    row_shards

TRANSPORTS = ("auto", "ragged", "padded")


def expert_parallel_size() -> int:
    """The ``expert`` axis size of the context mesh (1 without one)."""
    mesh = context_mesh()
    return 1 if mesh is None else dict(mesh.shape).get(EXPERT_AXIS, 1)


def receive_slot_rows(tokens: int, top_k: int, experts_per_device: int) -> int:
    """``C``: the most rows one device can send another (a token's ``k`` experts are distinct)."""
    return tokens * min(top_k, experts_per_device)


def transport_for(platform: str) -> str:
    """``"padded"`` on CPU (no ragged-all-to-all in XLA:CPU), ``"ragged"`` elsewhere."""
    return "padded" if platform == "cpu" else "ragged"


def all_to_all_bytes(tokens: int, hidden: int, top_k: int, num_experts: int, ep: int,
                     dtype_bytes: int, transport: str) -> int:
    """Bytes one device sends in one MoE layer's forward (rows out + results back), ``tokens``
    being its own tokens. The backward sends the same again (the transposed all-to-alls)."""
    if ep <= 1:
        return 0
    if transport == "ragged":      # exactly the routed rows; (ep-1)/ep of them leave the device
        rows = tokens * top_k * (ep - 1) / ep
    else:                          # every slot whole, ep-1 of the ep slots leave the device
        rows = (ep - 1) * receive_slot_rows(tokens, top_k, num_experts // ep)
    return int(2 * rows * hidden * dtype_bytes)


def expert_parallel_temp_bytes(tokens: int, hidden: int, ffn: int, top_k: int, num_experts: int,
                               ep: int, dtype_bytes: int) -> int:
    """One device's MoE temporaries under expert parallelism (fwd + bwd peak, as
    ``moe.moe_layer_cost`` counts them, for the receive buffer's ``ep · C`` rows in its block
    layout over the ``E / ep`` local experts) plus the send and receive buffers."""
    local = num_experts // ep
    rows = ep * receive_slot_rows(tokens, top_k, local)
    b = default_block_rows(rows, local)
    padded = max_blocks(rows, local, b) * b
    return dtype_bytes * (padded * hidden + 4 * padded * ffn + 2 * hidden * ffn + 2 * rows * hidden)


# ------------------------------------------------------------------------------ shared pieces
def _combine(y_RH, token_R, weight_R, tokens: int):
    """``out[t] = Σ weight · y`` over the rows of token ``t`` (fp32); token ``tokens`` = dropped."""
    y = y_RH.astype(jnp.float32) * weight_R[:, None]
    return jnp.zeros((tokens, y_RH.shape[1]), jnp.float32).at[token_R].add(y, mode="drop")


# ------------------------------------------------------------------------------ one device
def dispatch_local(experts, x_NH, experts_NK, weights_NK, num_experts: int):
    """Rows = (token, slot) pairs sorted by expert, gathered into the grouped matmul's block
    layout (each expert's group padded to whole blocks; padding rows are zero); fp32 ``[N, H]``."""
    N, K = experts_NK.shape
    flat_expert = experts_NK.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)               # sorted row -> (token, slot)
    group_sizes_E = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
    layout = block_layout(group_sizes_E, N * K)
    valid_P = layout.src_P < N * K
    slot_P = order[jnp.minimum(layout.src_P, N * K - 1)]
    token_P = jnp.where(valid_P, slot_P // K, N)                # N: out of range, dropped
    weight_P = jnp.where(valid_P, weights_NK.reshape(-1)[slot_P], 0.0)
    x_PH = jnp.take(x_NH, token_P, axis=0, mode="fill", fill_value=0)
    return _combine(experts(x_PH, layout), token_P, weight_P, N)


def moe_layer(moe, x_NH, mask_N, transport: str = "auto"):
    """``(out_NH fp32, router_stats)`` of a ``SparseMoE``: expert-parallel when the context mesh
    has an ``expert`` axis > 1, else routed and computed on this device."""
    if expert_parallel_size() > 1 or _row_devices(x_NH.shape[0]) > 1:
        return moe_layer_expert_parallel(moe, x_NH, mask_N, transport=transport)
    weights_NK, experts_NK, stats = moe.route(x_NH, mask_N)
    return dispatch_local(moe.experts, x_NH, experts_NK, weights_NK, moe.num_experts), stats


# ------------------------------------------------------------------------------ expert parallel
def _row_devices(tokens: int) -> int:
    """Devices the context mesh splits ``tokens`` rows over, when they divide evenly (else 1:
    the layer then runs on all the rows as one array).

    Routing sorts the rows by expert; under GSPMD that sort over a batch split across devices is
    global, so every device would gather and run ALL the tokens of the batch (measured: a
    compile-only v5p-16 MELT-Mixtral step held [P, I] buffers of the whole micro-batch, 8x the
    rows, 40.15 GiB against the planner's 29.29). Routing per device under ``shard_map`` keeps
    each device on its own rows (the expert weights enter whole, like any fsdp weight)."""
    mesh = context_mesh()
    if mesh is None:
        return 1
    n = row_shards(mesh)
    return n if tokens % n == 0 else 1


def _spec_of(variable) -> P:
    """A variable's spec inside the layer's ``shard_map``: split over ``expert`` where the sharding
    rules split its first logical axis over it (the expert-stacked weights), else whole."""
    axes = variable.get_metadata().get("logical_axes") or (None,)
    split = mesh_axes_of(axes[0]) if axes[0] is not None else ()
    return P(EXPERT_AXIS) if EXPERT_AXIS in split else P()


def moe_layer_expert_parallel(moe, x_NH, mask_N, transport: str = "auto"):
    """:func:`moe_layer` with the experts split over the ``expert`` axis (module docstring):
    each device routes its own rows, so neither the router's output nor any expert weight is
    gathered across devices; the router statistics are summed over the devices. With no
    ``expert`` axis > 1 (the batch split over data/fsdp only) each device runs
    :func:`dispatch_local` on its own rows."""
    if transport not in TRANSPORTS:
        raise ValueError(f"expert-parallel transport {transport!r} is not one of {TRANSPORTS}")
    mesh = context_mesh()
    E = moe.num_experts
    ep = dict(mesh.shape).get(EXPERT_AXIS, 1)
    if E % ep:
        raise ValueError(f"num_experts={E} is not divisible by mesh axis {EXPERT_AXIS}={ep}")
    rows, n_rows = row_axes(mesh), row_shards(mesh)
    if x_NH.shape[0] % n_rows:
        raise ValueError(f"expert parallelism: {x_NH.shape[0]} tokens per call cannot split over "
                         f"mesh axes {rows} ({n_rows} devices)")
    graphdef, state = nnx.split(moe)
    flat = list(nnx.to_flat_state(state))
    paths = [path for path, _ in flat]
    variables = [var for _, var in flat]

    def local(x_nH, mask_n, values):
        fresh = nnx.merge(graphdef, nnx.from_flat_state(
            [(p, v.replace(val)) for p, v, val in zip(paths, variables, values)]))
        weights_nK, experts_nK, stats = fresh.route(x_nH, mask_n)
        if ep == 1:           # the batch split over devices, every expert on each: no exchange
            out = dispatch_local(fresh.experts, x_nH, experts_nK, weights_nK, E)
            return out, stats[None], nnx.state(fresh, nnx.RngState)

        def exchange(platform):
            kind = transport_for(platform) if transport == "auto" else transport
            return _exchange(fresh.experts, x_nH, experts_nK, weights_nK, E, ep, kind)
        # The mesh's devices name the platform (a module's dropout cannot advance its RNG
        # inside lax.platform_dependent's branches); a device-less mesh stages both.
        device = getattr(mesh, "abstract_device", None)
        out = exchange(device.platform) if device is not None else on_target(exchange)
        return out, stats[None], nnx.state(fresh, nnx.RngState)

    out, stats, rng_state = jax.shard_map(
        local, in_specs=(P(rows), P(rows), [_spec_of(v) if ep > 1 else P() for v in variables]),
        out_specs=(P(rows), P(rows), P()), check_vma=False,
    )(x_NH, mask_N, [v.get_value() for v in variables])
    nnx.update(moe, rng_state)
    return out, jnp.sum(stats, axis=0)


def _exchange(experts, x_nH, experts_nK, weights_nK, E: int, ep: int, transport: str):
    """One device's part: send its rows to their experts' devices, run the local experts on what
    it received, send the results back, combine. ``[n, H]`` fp32."""
    n, K = experts_nK.shape
    H = x_nH.shape[1]
    R, El = n * K, E // ep
    C = receive_slot_rows(n, K, El)
    # (1) sort this device's rows by expert: the rows for device d are contiguous
    flat_expert = experts_nK.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    sorted_expert = flat_expert[order]
    sizes_E = jnp.bincount(flat_expert, length=E).astype(jnp.int32)
    send_sizes = sizes_E.reshape(ep, El).sum(axis=1)                     # [ep] rows to device d
    send_offsets = jnp.cumsum(send_sizes) - send_sizes
    x_RH = jnp.take(x_nH, order // K, axis=0)
    # (2) how many rows each sender sends me, per local expert: [ep senders, El]
    recv_EL = jax.lax.all_to_all(sizes_E.reshape(ep, El), EXPERT_AXIS, 0, 0, tiled=True)
    recv_sizes = recv_EL.sum(axis=1)
    # (3) rows out: slot s of the receive buffer [ep * C, H] holds sender s's rows
    if transport == "ragged":
        me = jax.lax.axis_index(EXPERT_AXIS)
        buf = jax.lax.ragged_all_to_all(
            x_RH, jnp.zeros((ep * C, H), x_RH.dtype), send_offsets, send_sizes,
            jnp.full((ep,), me * C, jnp.int32), recv_sizes, axis_name=EXPERT_AXIS)
    else:
        j_C = jnp.arange(C, dtype=jnp.int32)
        src = send_offsets[:, None] + j_C[None, :]                          # [ep, C]
        src = jnp.where(j_C[None, :] < send_sizes[:, None], src, R).reshape(-1)
        send = jnp.take(x_RH, src, axis=0, mode="fill", fill_value=0)
        buf = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)
    # (4) sort the buffer by local expert into the block layout; run the local experts
    r = jnp.arange(ep * C, dtype=jnp.int32)
    ends = jnp.cumsum(recv_EL, axis=1)                                     # [ep, El]
    local_expert = jnp.sum((r % C)[:, None] >= ends[r // C], axis=1)     # El: an empty row
    order2 = jnp.argsort(local_expert, stable=True)
    layout = block_layout(recv_EL.sum(axis=0), ep * C)
    valid_P = layout.src_P < ep * C
    row_P = jnp.where(valid_P, order2[jnp.minimum(layout.src_P, ep * C - 1)], ep * C)
    y_PH = experts(jnp.take(buf, row_P, axis=0, mode="fill", fill_value=0), layout)
    sorted_pos = jnp.zeros((ep * C,), jnp.int32).at[order2].set(r)
    y_buf = jnp.where((local_expert < El)[:, None], y_PH[layout.dst_M[sorted_pos]], 0)
    # (5) results back to their senders, in the sender's sorted order
    if transport == "ragged":
        back_offsets = jax.lax.all_to_all(send_offsets, EXPERT_AXIS, 0, 0, tiled=True)
        y_RH = jax.lax.ragged_all_to_all(
            y_buf, jnp.zeros((R, H), y_buf.dtype), jnp.arange(ep, dtype=jnp.int32) * C,
            recv_sizes, back_offsets, send_sizes, axis_name=EXPERT_AXIS)
    else:
        back = jax.lax.all_to_all(y_buf, EXPERT_AXIS, 0, 0, tiled=True)
        dest = sorted_expert // El
        y_RH = back[dest * C + jnp.arange(R, dtype=jnp.int32) - send_offsets[dest]]
    return _combine(y_RH, order // K, weights_nK.reshape(-1)[order], n)
