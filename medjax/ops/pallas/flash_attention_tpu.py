"""The flash-attention kernels blocked for TPU: key (or query) blocks are a grid axis.

A Mosaic BlockSpec block is copied into VMEM (double-buffered), so no kernel may hold a whole
sequence: at 4k-32k tokens that overflows the 16-32 MiB of scoped VMEM. Here every operand is
a tile, and the sequence being reduced over is the LAST grid axis, with "arbitrary" semantics
(its steps run in order on one core), carrying the running state in VMEM scratch:

* forward, grid ``(B, Hq, T/bq, steps)``: scratch max ``m``, sum ``l`` and accumulator ``acc``
  (fp32); step ``t`` visits key block ``kv_lo + t``; the last step writes output and LSE.
* dQ, same grid: scratch ``dq`` (fp32).
* dK/dV, grid ``(B, Hkv, S/bk, G, steps)``: scratch ``dk``, ``dv``; the two sequential axes
  walk the G query heads of the KV head and, for each, the query blocks that see this key
  block, so dK/dV of a KV head are summed in VMEM and written once (GQA, no repeated K/V).

Block skipping: the per-row block ranges ``[lo, hi)`` (``blocks.block_visibility``) are
scalar-prefetched into SMEM; index maps read them and clamp to the last needed block
(``blocks.clamped_block``), so the steps past ``hi`` re-use the block already in VMEM (no DMA)
and the kernel body does nothing there. Inside the range an empty tile (a hole between packed
segments) skips both matmuls. Metadata is tiled like the data. The tile math is
``blocks.softmax_step`` and the same masks as the Triton-structured kernels.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from medjax.ops.pallas import blocks


def _visit(in_range, qpos_ref, qseg_ref, kvpos_ref, kvseg_ref, cfg, compute):
    """Run ``compute(mask or None)`` for an in-range tile whose mask has a visible element."""
    @pl.when(in_range)
    def _():
        if not cfg.masked:
            compute(None)
            return
        mask_QK = blocks.tile_mask(qpos_ref[...], qseg_ref[...], kvpos_ref[...], kvseg_ref[...],
                                   cfg)
        pl.when(jnp.logical_not(blocks.tile_is_empty(mask_QK)))(lambda: compute(mask_QK))


# ---------------------------------------------------------------- kernels
def forward_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kvpos_ref, kvseg_ref,
                o_ref, lse_ref, m_scr, l_scr, acc_scr, *, cfg):
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(t == 0)
    def _init():
        m_scr[...], l_scr[...], acc_scr[...] = blocks.softmax_init(*acc_scr.shape)

    def compute(mask_QK):
        carry = (m_scr[...], l_scr[...], acc_scr[...])
        m_scr[...], l_scr[...], acc_scr[...] = blocks.softmax_step(
            carry, q_ref[...], k_ref[...], v_ref[...], mask_QK, cfg)

    _visit(lo_ref[b, i] + t < hi_ref[b, i], qpos_ref, qseg_ref, kvpos_ref, kvseg_ref, cfg,
           compute)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        out_QD, lse_Q1 = blocks.finish_softmax(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out_QD.astype(o_ref.dtype)
        lse_ref[...] = lse_Q1


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref,
               qseg_ref, kvpos_ref, kvseg_ref, dq_ref, dq_scr, *, cfg):
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(t == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def compute(mask_QK):
        k_KD, v_KD = k_ref[...], v_ref[...]
        p_QK = jnp.exp(blocks.dot_nt(q_ref[...], k_KD, cfg) * cfg.scale - lse_ref[...])
        if mask_QK is not None:
            p_QK = jnp.where(mask_QK, p_QK, 0.0)
        ds_QK = p_QK * (blocks.dot_nt(do_ref[...], v_KD, cfg) - delta_ref[...])
        dq_scr[...] += blocks.dot_nn(ds_QK.astype(k_KD.dtype), k_KD, cfg)

    _visit(lo_ref[b, i] + t < hi_ref[b, i], qpos_ref, qseg_ref, kvpos_ref, kvseg_ref, cfg,
           compute)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref,
                 qseg_ref, kvpos_ref, kvseg_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, cfg):
    b, j, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    first = (g == 0) & (t == 0)
    last = (g == pl.num_programs(3) - 1) & (t == pl.num_programs(4) - 1)

    @pl.when(first)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def compute(mask_QK):
        q_QD, do_QD, k_KD, v_KD = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        p_QK = jnp.exp(blocks.dot_nt(q_QD, k_KD, cfg) * cfg.scale - lse_ref[...])
        if mask_QK is not None:
            p_QK = jnp.where(mask_QK, p_QK, 0.0)
        dv_scr[...] += blocks.dot_tn(p_QK.astype(do_QD.dtype), do_QD, cfg)
        ds_QK = p_QK * (blocks.dot_nt(do_QD, v_KD, cfg) - delta_ref[...])
        dk_scr[...] += blocks.dot_tn(ds_QK.astype(q_QD.dtype), q_QD, cfg)

    _visit(lo_ref[b, j] + t < hi_ref[b, j], qpos_ref, qseg_ref, kvpos_ref, kvseg_ref, cfg,
           compute)

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------- pallas_calls
def _q_grid_specs(cfg, G, D):
    """Specs for grid ``(b, h, i, t)`` (+ prefetched ``lo, hi``): query tile i of head h, key
    block ``lo + t`` of KV head ``h // G``. Returns (q-like, k/v, per-row stat, 4 metadata)."""
    bq, bk = cfg.block_q, cfg.block_k
    kv_blk = lambda b, i, t, lo, hi: blocks.clamped_block(lo, hi, b, i, t)
    q = pl.BlockSpec((None, None, bq, D), lambda b, h, i, t, lo, hi: (b, h, i, 0))
    kv = pl.BlockSpec((None, None, bk, D), lambda b, h, i, t, lo, hi:
                      (b, h // G, kv_blk(b, i, t, lo, hi), 0))
    stat = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, t, lo, hi: (b, h, i, 0))
    q_meta = pl.BlockSpec((None, bq, 1), lambda b, h, i, t, lo, hi: (b, i, 0))
    kv_meta = pl.BlockSpec((None, 1, bk), lambda b, h, i, t, lo, hi:
                           (b, 0, kv_blk(b, i, t, lo, hi)))
    return q, kv, stat, [q_meta, q_meta, kv_meta, kv_meta]


def _cost(cfg, q, k, passes, extra_bytes=0):
    B, Hq, Tp, D = q.shape
    Sp = k.shape[2]
    nbytes = 2 * (q.size + k.size) * q.dtype.itemsize   # q, k, v, out
    return blocks.attention_cost(batch=B, heads=Hq, q_rows=Tp, keys=Sp, head_dim=D,
                                 causal=cfg.causal, window=cfg.window, passes=passes,
                                 bytes_accessed=nbytes + extra_bytes)


def forward(cfg, q, k, v, meta):
    """Output ``[B, Hq, Tp, D]`` and LSE ``[B, Hq, Tp, 1]`` (fp32); layout heads-first."""
    q_pos, q_seg, kv_pos, kv_seg, kv_lo, kv_hi, _, _ = meta
    B, Hq, Tp, D = q.shape
    Hkv, Sp = k.shape[1], k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    q_spec, kv_spec, stat_spec, meta_specs = _q_grid_specs(cfg, Hq // Hkv, D)
    return blocks.pallas_call(
        functools.partial(forward_kernel, cfg=cfg), cfg, grid=(B, Hq, Tp // bq, Sp // bk),
        num_scalar_prefetch=2, sequential_axes=1,
        in_specs=[q_spec, kv_spec, kv_spec, *meta_specs],
        out_specs=[q_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, Hq, Tp, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, D), jnp.float32)],
        cost=_cost(cfg, q, k, passes=2, extra_bytes=B * Hq * Tp * 4),
        head_dim=D, name="medjax_flash_fwd",
    )(kv_lo, kv_hi, q, k, v, q_pos, q_seg, kv_pos, kv_seg)


def backward(cfg, q, k, v, meta, out, lse, do):
    """dQ, dK, dV in the heads-first layout of the inputs."""
    q_pos, q_seg, kv_pos, kv_seg, kv_lo, kv_hi, q_lo, q_hi = meta
    B, Hq, Tp, D = q.shape
    Hkv, Sp = k.shape[1], k.shape[2]
    G, bq, bk = Hq // Hkv, cfg.block_q, cfg.block_k
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)

    q_spec, kv_spec, stat_spec, meta_specs = _q_grid_specs(cfg, G, D)
    dq = blocks.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg), cfg, grid=(B, Hq, Tp // bq, Sp // bk),
        num_scalar_prefetch=2, sequential_axes=1,
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec,
                  *meta_specs],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)],
        cost=_cost(cfg, q, k, passes=3, extra_bytes=2 * q.size * q.dtype.itemsize),
        head_dim=D, name="medjax_flash_bwd_dq",
    )(kv_lo, kv_hi, q, k, v, do, lse, delta, q_pos, q_seg, kv_pos, kv_seg)

    # grid (b, h_kv, j, g, t): key tile j; query head h*G + g, query block q_lo + t.
    q_blk = lambda b, j, t, lo, hi: blocks.clamped_block(lo, hi, b, j, t)
    q_tile = pl.BlockSpec((None, None, bq, D), lambda b, h, j, g, t, lo, hi:
                          (b, h * G + g, q_blk(b, j, t, lo, hi), 0))
    stat_tile = pl.BlockSpec((None, None, bq, 1), lambda b, h, j, g, t, lo, hi:
                             (b, h * G + g, q_blk(b, j, t, lo, hi), 0))
    kv_tile = pl.BlockSpec((None, None, bk, D), lambda b, h, j, g, t, lo, hi: (b, h, j, 0))
    q_meta = pl.BlockSpec((None, bq, 1), lambda b, h, j, g, t, lo, hi:
                          (b, q_blk(b, j, t, lo, hi), 0))
    kv_meta = pl.BlockSpec((None, 1, bk), lambda b, h, j, g, t, lo, hi: (b, 0, j))
    dk, dv = blocks.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg), cfg, grid=(B, Hkv, Sp // bk, G, Tp // bq),
        num_scalar_prefetch=2, sequential_axes=2,
        in_specs=[q_tile, kv_tile, kv_tile, q_tile, stat_tile, stat_tile,
                  q_meta, q_meta, kv_meta, kv_meta],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
        cost=_cost(cfg, q, k, passes=4, extra_bytes=2 * q.size * q.dtype.itemsize),
        head_dim=D, name="medjax_flash_bwd_dkdv",
    )(q_lo, q_hi, q, k, v, do, lse, delta, q_pos, q_seg, kv_pos, kv_seg)
    return dq, dk, dv
