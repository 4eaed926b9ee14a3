"""Flash attention in Pallas: forward, backward (dQ kernel + dK/dV kernel), ``jax.custom_vjp``.

One algorithm (FlashAttention-2) lowered three ways from the same kernel bodies: Triton on GPU,
Mosaic on TPU, ``interpret=True`` on CPU. The ground truth is
``medjax.ops.attention.attention_reference``.

* Forward, grid ``(B, Hq, T/bq)``: each program holds one query tile and walks the key blocks
  of its KV head (``h // G``: GQA by index map, K/V are never repeated) with an online softmax
  in fp32; it writes the output and the log-sum-exp (LSE) that the backward needs.
* dQ, grid ``(B, Hq, T/bq)``: recomputes P from the LSE, ``dS = P * (dO V^T - delta)``,
  ``dQ = scale * dS K``, where ``delta = rowsum(dO * O)`` (computed by XLA, O(T D)).
* dK/dV, grid ``(B, Hkv, S/bk)``: one key tile per program; loops over the query blocks that
  can see it and, inside, over the G query heads of the group, so dK/dV for a KV head are
  summed in registers and written once.

Only key (or query) blocks that can hold a visible pair are visited; see ``blocks.py``.
Layouts: ``[B, T, H, D]`` as given on GPU / interpret (no transposes), ``[B, H, T, D]`` on TPU
(Mosaic tiles the last two dims of a block).

These kernels hold a whole head's K/V (or a group's Q/dO) in one block: right for Triton, where
a block is a pointer into HBM. On TPU a block is copied into VMEM, so the "mosaic_tpu" and
"mosaic_interpret" backends run the same math blocked over a grid axis instead
(``flash_attention_tpu.py``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from medjax.ops.mask import default_positions, split_segments
from medjax.ops.pallas import blocks, flash_attention_tpu
from medjax.ops.pallas.blocks import KernelConfig


# ---------------------------------------------------------------- BlockSpecs per layout
def _seq_spec(cfg, seq_block, heads, D, index):
    """Spec over a [B, T, H, D] (or [B, H, T, D]) array; ``index(grid ids) -> (b, t_blk, h_blk)``.

    ``heads=None`` squeezes the head axis (kernel sees ``[seq, D]``), an int keeps that many.
    """
    if cfg.heads_first:
        return pl.BlockSpec((None, heads, seq_block, D),
                            lambda *ids: (index(*ids)[0], index(*ids)[2], index(*ids)[1], 0))
    return pl.BlockSpec((None, seq_block, heads, D),
                        lambda *ids: (index(*ids)[0], index(*ids)[1], index(*ids)[2], 0))


def _head_tile(ref, cfg, g, start, size):
    """Rows ``[start, start+size)`` of head ``g`` from a group ref."""
    if cfg.heads_first:
        return ref[g, pl.ds(start, size), :]
    return ref[pl.ds(start, size), g, :]


# ---------------------------------------------------------------- kernels
def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kvpos_ref, kvseg_ref,
                o_ref, lse_ref, *, cfg):
    b, i = pl.program_id(0), pl.program_id(2)
    kv_block = blocks.contiguous_kv(k_ref, v_ref, cfg.block_k)
    m, l, acc = blocks.online_softmax(q_ref[...], qpos_ref[...], qseg_ref[...], kv_block,
                                      kvpos_ref, kvseg_ref, lo_ref[b, i], hi_ref[b, i], cfg)
    out_QD, lse_Q1 = blocks.finish_softmax(m, l, acc)
    o_ref[...] = out_QD.astype(o_ref.dtype)
    lse_ref[...] = lse_Q1


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref,
               qseg_ref, kvpos_ref, kvseg_ref, dq_ref, *, cfg):
    b, i = pl.program_id(0), pl.program_id(2)
    q_QD, do_QD = q_ref[...], do_ref[...]
    lse_Q1, delta_Q1 = lse_ref[...], delta_ref[...]
    qpos_Q1, qseg_Q1 = qpos_ref[...], qseg_ref[...]
    bk = cfg.block_k

    def step(dq_QD, start, mask_QK):
        k_KD = k_ref[pl.ds(start, bk), :]
        v_KD = v_ref[pl.ds(start, bk), :]
        p_QK = jnp.exp(blocks.dot_nt(q_QD, k_KD, cfg) * cfg.scale - lse_Q1)
        if mask_QK is not None:
            p_QK = jnp.where(mask_QK, p_QK, 0.0)
        ds_QK = p_QK * (blocks.dot_nt(do_QD, v_KD, cfg) - delta_Q1)
        return dq_QD + blocks.dot_nn(ds_QK.astype(k_KD.dtype), k_KD, cfg)

    def body(j, dq_QD):
        start = pl.multiple_of(j * bk, bk)
        if not cfg.masked:
            return step(dq_QD, start, None)
        mask_QK = blocks.tile_mask(qpos_Q1, qseg_Q1, kvpos_ref[:, pl.ds(start, bk)],
                                   kvseg_ref[:, pl.ds(start, bk)], cfg)
        return blocks.skip_if_empty(mask_QK, lambda c: step(c, start, mask_QK), dq_QD)

    dq_QD = lax.fori_loop(lo_ref[b, i], hi_ref[b, i], body, jnp.zeros(q_QD.shape, jnp.float32))
    dq_ref[...] = (dq_QD * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref,
                 qseg_ref, kvpos_ref, kvseg_ref, dk_ref, dv_ref, *, cfg, groups):
    b, j = pl.program_id(0), pl.program_id(2)
    k_KD, v_KD = k_ref[...], v_ref[...]
    kvpos_1K, kvseg_1K = kvpos_ref[...], kvseg_ref[...]
    bq = cfg.block_q

    def step_head(g, carry, start, mask_QK):
        dk_KD, dv_KD = carry
        q_QD = _head_tile(q_ref, cfg, g, start, bq)
        do_QD = _head_tile(do_ref, cfg, g, start, bq)
        lse_Q1 = lse_ref[g, pl.ds(start, bq), :]
        delta_Q1 = delta_ref[g, pl.ds(start, bq), :]
        p_QK = jnp.exp(blocks.dot_nt(q_QD, k_KD, cfg) * cfg.scale - lse_Q1)
        if mask_QK is not None:
            p_QK = jnp.where(mask_QK, p_QK, 0.0)
        dv_KD = dv_KD + blocks.dot_tn(p_QK.astype(do_QD.dtype), do_QD, cfg)
        ds_QK = p_QK * (blocks.dot_nt(do_QD, v_KD, cfg) - delta_Q1)
        dk_KD = dk_KD + blocks.dot_tn(ds_QK.astype(q_QD.dtype), q_QD, cfg)
        return dk_KD, dv_KD

    def over_heads(carry, start, mask_QK):
        return lax.fori_loop(0, groups, lambda g, c: step_head(g, c, start, mask_QK), carry)

    def body(i, carry):
        start = pl.multiple_of(i * bq, bq)
        if not cfg.masked:
            return over_heads(carry, start, None)
        mask_QK = blocks.tile_mask(qpos_ref[pl.ds(start, bq), :], qseg_ref[pl.ds(start, bq), :],
                                   kvpos_1K, kvseg_1K, cfg)
        return blocks.skip_if_empty(mask_QK, lambda c: over_heads(c, start, mask_QK), carry)

    zeros_KD = jnp.zeros(k_KD.shape, jnp.float32)
    dk_KD, dv_KD = lax.fori_loop(lo_ref[b, j], hi_ref[b, j], body, (zeros_KD, zeros_KD))
    dk_ref[...] = (dk_KD * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_KD.astype(dv_ref.dtype)


# ---------------------------------------------------------------- pallas_calls
def _dims(cfg, q, k):
    if cfg.heads_first:
        B, Hq, Tp, D = q.shape
        Hkv, Sp = k.shape[1], k.shape[2]
    else:
        B, Tp, Hq, D = q.shape
        Sp, Hkv = k.shape[1], k.shape[2]
    return B, Tp, Sp, Hq, Hkv, D


def _metadata_specs(cfg, Tp, Sp, q_tiled: bool):
    bq, bk = cfg.block_q, cfg.block_k
    if q_tiled:   # grid (B, H, q blocks): q metadata tiled, kv metadata whole
        q_spec = pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0))
        kv_spec = pl.BlockSpec((None, 1, Sp), lambda b, h, i: (b, 0, 0))
    else:         # grid (B, Hkv, kv blocks)
        q_spec = pl.BlockSpec((None, Tp, 1), lambda b, h, j: (b, 0, 0))
        kv_spec = pl.BlockSpec((None, 1, bk), lambda b, h, j: (b, 0, j))
    return [q_spec, q_spec, kv_spec, kv_spec]


def _cost(cfg, q, k, passes):
    B, Tp, Sp, Hq, Hkv, D = _dims(cfg, q, k)
    return blocks.attention_cost(batch=B, heads=Hq, q_rows=Tp, keys=Sp, head_dim=D,
                                 causal=cfg.causal, window=cfg.window, passes=passes,
                                 bytes_accessed=2 * (q.size + k.size) * q.dtype.itemsize)


def _forward(cfg, q, k, v, meta):
    if cfg.kv_grid:
        return flash_attention_tpu.forward(cfg, q, k, v, meta)
    q_pos, q_seg, kv_pos, kv_seg, kv_lo, kv_hi, _, _ = meta
    B, Tp, Sp, Hq, Hkv, D = _dims(cfg, q, k)
    G, bq = Hq // Hkv, cfg.block_q
    table = blocks.scalar_table_spec(cfg)
    q_tile = _seq_spec(cfg, bq, None, D, lambda b, h, i: (b, i, h))
    kv_whole = _seq_spec(cfg, Sp, None, D, lambda b, h, i: (b, 0, h // G))
    lse_tile = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    out, lse = blocks.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg), cfg, grid=(B, Hq, Tp // bq),
        in_specs=[table, table, q_tile, kv_whole, kv_whole,
                  *_metadata_specs(cfg, Tp, Sp, q_tiled=True)],
        out_specs=[q_tile, lse_tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, Hq, Tp, 1), jnp.float32)],
        cost=_cost(cfg, q, k, passes=2), head_dim=D, name="medjax_flash_fwd",
    )(kv_lo, kv_hi, q, k, v, q_pos, q_seg, kv_pos, kv_seg)
    return out, lse


def _backward(cfg, q, k, v, meta, out, lse, do):
    if cfg.kv_grid:
        return flash_attention_tpu.backward(cfg, q, k, v, meta, out, lse, do)
    q_pos, q_seg, kv_pos, kv_seg, kv_lo, kv_hi, q_lo, q_hi = meta
    B, Tp, Sp, Hq, Hkv, D = _dims(cfg, q, k)
    G, bq, bk = Hq // Hkv, cfg.block_q, cfg.block_k
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta_BHT1 = (delta if cfg.heads_first else delta.transpose(0, 2, 1))[..., None]
    table = blocks.scalar_table_spec(cfg)

    q_tile = _seq_spec(cfg, bq, None, D, lambda b, h, i: (b, i, h))
    kv_whole = _seq_spec(cfg, Sp, None, D, lambda b, h, i: (b, 0, h // G))
    stat_tile = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
    dq = blocks.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg), cfg, grid=(B, Hq, Tp // bq),
        in_specs=[table, table, q_tile, kv_whole, kv_whole, q_tile, stat_tile, stat_tile,
                  *_metadata_specs(cfg, Tp, Sp, q_tiled=True)],
        out_specs=q_tile, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        cost=_cost(cfg, q, k, passes=3), head_dim=D, name="medjax_flash_bwd_dq",
    )(kv_lo, kv_hi, q, k, v, do, lse, delta_BHT1, q_pos, q_seg, kv_pos, kv_seg)

    q_group = _seq_spec(cfg, Tp, G, D, lambda b, h, j: (b, 0, h))
    kv_tile = _seq_spec(cfg, bk, None, D, lambda b, h, j: (b, j, h))
    stat_group = pl.BlockSpec((None, G, Tp, 1), lambda b, h, j: (b, h, 0, 0))
    dk, dv = blocks.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, groups=G), cfg, grid=(B, Hkv, Sp // bk),
        in_specs=[table, table, q_group, kv_tile, kv_tile, q_group, stat_group, stat_group,
                  *_metadata_specs(cfg, Tp, Sp, q_tiled=False)],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        cost=_cost(cfg, q, k, passes=4), head_dim=D, name="medjax_flash_bwd_dkdv",
    )(q_lo, q_hi, q, k, v, do, lse, delta_BHT1, q_pos, q_seg, kv_pos, kv_seg)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_core(cfg, q, k, v, meta):
    return _forward(cfg, q, k, v, meta)[0]


def _flash_core_fwd(cfg, q, k, v, meta):
    out, lse = _forward(cfg, q, k, v, meta)
    return out, (q, k, v, meta, out, lse)


def _flash_core_bwd(cfg, residuals, do):
    q, k, v, meta, out, lse = residuals
    dq, dk, dv = _backward(cfg, q, k, v, meta, out, lse, do)
    return dq, dk, dv, None


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


# ---------------------------------------------------------------- public entry point
def _fit_block(block: int, n: int) -> int:
    """Shrink a block for short sequences (power of two, >= 16 for tensor-core dots)."""
    return min(block, max(16, pl.next_power_of_2(n)))


def flash_attention(q, k, v, *, causal=True, sliding_window=None, segment_ids=None,
                    q_positions=None, kv_positions=None, kv_lengths=None, scale=None,
                    block_q=None, block_k=None, backend=None, heads_first=None):
    """Pallas flash attention with the ``medjax.ops.attention`` signature; differentiable.

    ``backend``: one of ``blocks.BACKENDS`` (default: from ``jax.default_backend()``).
    ``heads_first``: internal layout for the Triton-structured kernels (the TPU ones always
    use ``[B, H, T, D]``). Block sizes default per backend and TPU generation.
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape != (B, S, Hkv, D) or v.shape != k.shape:
        raise ValueError(f"k/v must be [B, S, Hkv, D] matching q {q.shape}; got {k.shape}, {v.shape}")
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not divisible by kv heads {Hkv}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    backend = backend or blocks.default_backend()
    if backend == "triton" and D not in (16, 32, 64, 128, 256):
        raise NotImplementedError(f"Triton flash attention needs a power-of-two head_dim, got {D}")
    if backend in blocks.KV_GRID_BACKENDS:
        heads_first = True          # the TPU kernels tile [T, D] per head
    heads_first = False if heads_first is None else heads_first
    default_q, default_k = blocks.default_blocks(backend)
    bq = _fit_block(block_q or default_q, T)
    bk = _fit_block(block_k or default_k, S)
    Tp, Sp = blocks.round_up(T, bq), blocks.round_up(S, bk)

    q_seg, kv_seg = split_segments(segment_ids)
    segmented = q_seg is not None
    q_seg = jnp.zeros((B, T), jnp.int32) if q_seg is None else jnp.asarray(q_seg, jnp.int32)
    kv_seg = jnp.zeros((B, S), jnp.int32) if kv_seg is None else jnp.asarray(kv_seg, jnp.int32)
    q_pos, kv_pos = default_positions(q, k, q_positions, kv_positions)
    q_pos, q_seg, kv_pos, kv_seg = blocks.padded_metadata(q_pos, q_seg, kv_pos, kv_seg,
                                                          kv_lengths, Tp, Sp)
    visible_BIJ = blocks.block_visibility(q_pos, q_seg, kv_pos, kv_seg, block_q=bq, block_k=bk,
                                          causal=causal, window=sliding_window)
    kv_lo, kv_hi = blocks.visible_range(visible_BIJ)
    q_lo, q_hi = blocks.visible_range(visible_BIJ.transpose(0, 2, 1))
    meta = (q_pos[:, :, None], q_seg[:, :, None], kv_pos[:, None, :], kv_seg[:, None, :],
            kv_lo, kv_hi, q_lo, q_hi)

    cfg = KernelConfig(
        scale=float(D ** -0.5 if scale is None else scale), causal=bool(causal),
        window=None if sliding_window is None else int(sliding_window),
        masked=bool(causal or sliding_window is not None or segmented
                    or kv_lengths is not None or Sp != S),
        block_q=bq, block_k=bk, backend=backend, heads_first=heads_first,
        fp32=q.dtype == jnp.float32)
    q_p = blocks.pad_axis(q, 1, Tp)
    k_p, v_p = blocks.pad_axis(k, 1, Sp), blocks.pad_axis(v, 1, Sp)
    if heads_first:
        q_p, k_p, v_p = (x.transpose(0, 2, 1, 3) for x in (q_p, k_p, v_p))
    out = _flash_core(cfg, q_p, k_p, v_p, meta)
    if heads_first:
        out = out.transpose(0, 2, 1, 3)
    return out[:, :T]
