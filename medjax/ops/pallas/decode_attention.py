"""Decode-time attention in Pallas: a few query tokens against a long KV cache (flash-decoding).

During generation T is 1 (or a few draft tokens), so a query tile of ``bq`` rows per head would be
mostly padding. Instead the G query heads that share a KV head are folded into the rows of ONE
tile (``rows = G * T``), so each KV block is read once per KV head, and each sequence's visible
key range is split into ``num_splits`` even chunks that run in parallel (grid
``(B, Hkv, splits)``). Each chunk returns a partial output and its log-sum-exp; XLA merges the
chunks (a softmax over the chunk LSEs). The paged kernel (``paged_attention``) reuses this form
with pages as key blocks.

Per-sequence ``kv_lengths`` and ``q_positions`` bound the key blocks visited: blocks past a
sequence's length (or outside its sliding window) are never loaded. The inner loop is the same
online softmax as the training kernel (``blocks.online_softmax``).

On TPU ("mosaic_tpu", "mosaic_interpret") the cache is not one VMEM block: the key blocks of a
split are a sequential grid axis (``(B, Hkv, splits, blocks per split)``) with the running
softmax state in VMEM scratch, the split's block range scalar-prefetched and the index maps
clamped to it (the forward kernel of ``flash_attention_tpu``, rows = folded heads).

Forward-only kernel; the ``custom_vjp`` backward re-runs ``flash_attention``'s backward so the
function stays differentiable.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from medjax.ops.mask import default_positions, split_segments
from medjax.ops.pallas import blocks
from medjax.ops.pallas.blocks import KernelConfig
from medjax.ops.pallas.flash_attention import flash_attention
from medjax.ops.pallas.flash_attention_tpu import forward_kernel as _blocked_decode_kernel


def decode_tile(lo_ref, hi_ref, q_ref, kv_block, qpos_ref, qseg_ref, kvpos_ref, kvseg_ref,
                o_ref, lse_ref, cfg):
    """One program of the looped form: the folded rows of (batch b, KV head) against key blocks
    ``[lo, hi)`` of split s (``kv_block``: see ``blocks.online_softmax``); writes the split's
    normalised output and log-sum-exp."""
    b, s = pl.program_id(0), pl.program_id(2)
    m, l, acc = blocks.online_softmax(q_ref[...], qpos_ref[...], qseg_ref[...], kv_block,
                                      kvpos_ref, kvseg_ref, lo_ref[b, s], hi_ref[b, s], cfg)
    out_RD, lse_R1 = blocks.finish_softmax(m, l, acc)
    o_ref[...] = out_RD
    lse_ref[...] = lse_R1


def _decode_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, *refs, cfg):
    decode_tile(lo_ref, hi_ref, q_ref, blocks.contiguous_kv(k_ref, v_ref, cfg.block_k), *refs,
                cfg=cfg)


def split_ranges(visible_BJ, num_splits):
    """Per (batch, split) key-block range ``[B, splits]``: each sequence's visible range (first
    to last visible block) cut into ``num_splits`` even chunks, so the splits share the work of
    a short sequence in a wide cache too. Invisible blocks inside a range are skipped in-kernel."""
    lo_B, hi_B = blocks.visible_range(visible_BJ)
    chunk_B = -(-(hi_B - lo_B) // num_splits)
    starts_BS = lo_B[:, None] + chunk_B[:, None] * jnp.arange(num_splits, dtype=jnp.int32)
    return jnp.minimum(starts_BS, hi_B[:, None]), jnp.minimum(starts_BS + chunk_B[:, None],
                                                               hi_B[:, None])


def fold_query_heads(q, num_kv_heads, rows_padded):
    """``[B, T, Hq, D]`` -> ``[B, Hkv, Rp, D]``: row ``r = g * T + t`` of KV head h's tile is
    query head ``h * G + g`` at token t; rows past ``G * T`` are zero."""
    B, T, Hq, D = q.shape
    G = Hq // num_kv_heads
    q_BKRD = q.reshape(B, T, num_kv_heads, G, D).transpose(0, 2, 3, 1, 4)
    return blocks.pad_axis(q_BKRD.reshape(B, num_kv_heads, G * T, D), 2, rows_padded)


def merge_splits(o_parts, lse_parts, T, Hq, dtype):
    """Softmax over the splits' log-sum-exps ``[B, Hkv, splits, Rp, 1]`` (empty: -inf) merges
    their outputs ``[B, Hkv, splits, Rp, D]``; returns ``[B, T, Hq, D]``."""
    lse_max = jnp.max(lse_parts, axis=2, keepdims=True)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    w_BKSR1 = jnp.exp(lse_parts - lse_max)
    total = jnp.sum(w_BKSR1, axis=2)
    out_BKRD = jnp.sum(w_BKSR1 * o_parts, axis=2) / jnp.where(total == 0, 1.0, total)
    return unfold_query_heads(out_BKRD, T, Hq, dtype)


def unfold_query_heads(out_BKRD, T, Hq, dtype):
    """Inverse of :func:`fold_query_heads`: ``[B, Hkv, Rp, D]`` -> ``[B, T, Hq, D]``."""
    B, Hkv, _, D = out_BKRD.shape
    G = Hq // Hkv
    out = out_BKRD[:, :, :G * T].reshape(B, Hkv, G, T, D).transpose(0, 3, 1, 2, 4)
    return out.reshape(B, T, Hq, D).astype(dtype)


def looped_call(kernel, cfg, args, out_shape, cost, *, kv_spec, num_tables=2,
                name="medjax_flash_decode"):
    """Grid ``(B, Hkv, splits)``; each program loops over its split's key blocks (Triton).

    ``args``: ``num_tables`` small int32 tables read with scalar indices (split ranges first),
    then q ``[B, Hkv, Rp, D]``, k, v (``kv_spec``), row positions/segments ``[B, Rp, 1]``, key
    positions/segments ``[B, 1, Sp]``."""
    B, Hkv, splits, Rp, D = out_shape[0].shape
    Sp = args[-1].shape[-1]
    table = blocks.scalar_table_spec(cfg)
    row_spec = pl.BlockSpec((None, Rp, 1), lambda b, h, s: (b, 0, 0))
    key_spec = pl.BlockSpec((None, 1, Sp), lambda b, h, s: (b, 0, 0))
    return blocks.pallas_call(
        functools.partial(kernel, cfg=cfg), cfg, grid=(B, Hkv, splits),
        in_specs=[*[table] * num_tables,
                  pl.BlockSpec((None, None, Rp, D), lambda b, h, s: (b, h, 0, 0)),
                  kv_spec, kv_spec, row_spec, row_spec, key_spec, key_spec],
        out_specs=[pl.BlockSpec((None, None, None, Rp, D), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, Rp, 1), lambda b, h, s: (b, h, s, 0, 0))],
        out_shape=out_shape, cost=cost, head_dim=D, name=name,
    )(*args)


def _looped_call(cfg, args, out_shape, cost):
    """The contiguous cache: program (b, h, s) sees rows ``[Sp, D]`` of KV head h."""
    D = out_shape[0].shape[-1]
    Sp = args[-1].shape[-1]
    if cfg.heads_first:
        kv_spec = pl.BlockSpec((None, None, Sp, D), lambda b, h, s: (b, h, 0, 0))
    else:
        kv_spec = pl.BlockSpec((None, Sp, None, D), lambda b, h, s: (b, 0, h, 0))
    return looped_call(_decode_kernel, cfg, args, out_shape, cost, kv_spec=kv_spec)


def _blocked_call(cfg, args, out_shape, steps, cost):
    """Grid ``(B, Hkv, splits, steps)``: key block ``lo + t`` of the split per step (TPU)."""
    B, Hkv, splits, Rp, D = out_shape[0].shape
    bk = cfg.block_k
    blk = lambda b, s, t, lo, hi: blocks.clamped_block(lo, hi, b, s, t)
    kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, s, t, lo, hi:
                           (b, h, blk(b, s, t, lo, hi), 0))
    row_spec = pl.BlockSpec((None, Rp, 1), lambda b, h, s, t, lo, hi: (b, 0, 0))
    key_spec = pl.BlockSpec((None, 1, bk), lambda b, h, s, t, lo, hi: (b, 0, blk(b, s, t, lo, hi)))
    q_spec = pl.BlockSpec((None, None, Rp, D), lambda b, h, s, t, lo, hi: (b, h, 0, 0))
    from jax.experimental.pallas import tpu as pltpu
    return blocks.pallas_call(
        functools.partial(_blocked_decode_kernel, cfg=cfg), cfg, grid=(B, Hkv, splits, steps),
        num_scalar_prefetch=2, sequential_axes=1,
        in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec, key_spec, key_spec],
        out_specs=[pl.BlockSpec((None, None, None, Rp, D), lambda b, h, s, t, lo, hi:
                                (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, Rp, 1), lambda b, h, s, t, lo, hi:
                                (b, h, s, 0, 0))],
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((Rp, 1), jnp.float32), pltpu.VMEM((Rp, 1), jnp.float32),
                        pltpu.VMEM((Rp, D), jnp.float32)],
        cost=cost, head_dim=D, name="medjax_flash_decode",
    )(*args)


def _decode_forward(static, q, k, v, mask_args):
    causal, window, scale, block_k, num_splits, backend, heads_first = static
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    rows = G * T
    Rp = max(16, pl.next_power_of_2(rows))
    bk = min(block_k, max(16, pl.next_power_of_2(S)))
    Sp = blocks.round_up(S, bk)
    nk = Sp // bk
    splits = max(1, min(num_splits, nk))

    q_seg, kv_seg = split_segments(mask_args["segment_ids"])
    segmented = q_seg is not None
    q_seg = jnp.zeros((B, T), jnp.int32) if q_seg is None else jnp.asarray(q_seg, jnp.int32)
    kv_seg = jnp.zeros((B, S), jnp.int32) if kv_seg is None else jnp.asarray(kv_seg, jnp.int32)
    q_pos, kv_pos = default_positions(q, k, mask_args["q_positions"], mask_args["kv_positions"])
    # Row r of a KV head's tile is (query head g, token t) with r = g * T + t.
    row_pos, row_seg, kv_pos, kv_seg = blocks.padded_metadata(
        jnp.tile(q_pos, (1, G)), jnp.tile(q_seg, (1, G)), kv_pos, kv_seg,
        mask_args["kv_lengths"], Rp, Sp)
    visible = blocks.block_visibility(row_pos, row_seg, kv_pos, kv_seg, block_q=Rp, block_k=bk,
                                      causal=causal, window=window)[:, 0]
    lo, hi = split_ranges(visible, splits)

    cfg = KernelConfig(scale=scale, causal=causal, window=window,
                       masked=bool(causal or window is not None or segmented
                                   or mask_args["kv_lengths"] is not None or Sp != S),
                       block_q=Rp, block_k=bk, backend=backend, heads_first=heads_first,
                       fp32=q.dtype == jnp.float32)
    q_BKRD = fold_query_heads(q, Hkv, Rp)
    k_p, v_p = blocks.pad_axis(k, 1, Sp), blocks.pad_axis(v, 1, Sp)
    if heads_first:
        k_p, v_p = k_p.transpose(0, 2, 1, 3), v_p.transpose(0, 2, 1, 3)
    cost = blocks.attention_cost(batch=B, heads=Hkv, q_rows=Rp, keys=Sp, head_dim=D,
                                 causal=False, window=window, passes=2,
                                 bytes_accessed=2 * k_p.size * k_p.dtype.itemsize)
    args = (lo, hi, q_BKRD, k_p, v_p, row_pos[:, :, None], row_seg[:, :, None],
            kv_pos[:, None, :], kv_seg[:, None, :])
    out_shape = [jax.ShapeDtypeStruct((B, Hkv, splits, Rp, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, splits, Rp, 1), jnp.float32)]
    if cfg.kv_grid:
        o_parts, lse_parts = _blocked_call(cfg, args, out_shape, -(-nk // splits), cost)
    else:
        o_parts, lse_parts = _looped_call(cfg, args, out_shape, cost)

    return merge_splits(o_parts, lse_parts, T, Hq, q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode_core(static, q, k, v, mask_args):
    return _decode_forward(static, q, k, v, mask_args)


def _decode_core_fwd(static, q, k, v, mask_args):
    return _decode_forward(static, q, k, v, mask_args), (q, k, v, mask_args)


def _decode_core_bwd(static, residuals, d_out):
    causal, window, scale, _, _, backend, heads_first = static
    q, k, v, mask_args = residuals
    _, vjp = jax.vjp(lambda q, k, v: flash_attention(
        q, k, v, causal=causal, sliding_window=window, scale=scale, backend=backend,
        heads_first=heads_first, **mask_args), q, k, v)
    return (*vjp(d_out), None)


_decode_core.defvjp(_decode_core_fwd, _decode_core_bwd)


def decode_attention(q, k, v, *, causal=True, sliding_window=None, segment_ids=None,
                     q_positions=None, kv_positions=None, kv_lengths=None, scale=None,
                     block_k=None, num_splits=8, backend=None, heads_first=None):
    """Attention for few queries vs a long KV cache; same signature/semantics as ``attention``."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not divisible by kv heads {Hkv}")
    backend = backend or blocks.default_backend()
    heads_first = True if backend in blocks.KV_GRID_BACKENDS else bool(heads_first)
    static = (bool(causal), None if sliding_window is None else int(sliding_window),
              float(D ** -0.5 if scale is None else scale),
              int(block_k or blocks.default_blocks(backend)[1]), int(num_splits), backend,
              bool(heads_first))
    mask_args = dict(segment_ids=segment_ids, q_positions=q_positions,
                     kv_positions=kv_positions, kv_lengths=kv_lengths)
    return _decode_core(static, q, k, v, mask_args)
