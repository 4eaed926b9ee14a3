"""Paged decode attention in Pallas: the decode kernel with pages as key blocks.

Both forms are ``decode_attention``'s, with the key block of step ``j`` of sequence ``b`` being
page ``page_table[b, j]`` of the heads-first pool ``[N, Hkv, page, D]`` (a ``[page, D]`` block of
one KV head). The G query heads sharing a KV head are folded into the rows of one tile; key
positions are logical (``j * page + slot``), so the masks (``kv_lengths``, causal by
``q_positions``, ``sliding_window``) and the visible page range per sequence are the decode
kernel's. Pages past a sequence's length or before its window are never read, so the page
table's entries there may hold anything.

* Triton ("triton" on GPU, "interpret" on CPU for tests): grid ``(B, Hkv, splits)``; each
  program loops over its split of the sequence's visible pages, reading the page index from the
  page table (an ordinary input, loaded as a scalar) and then the page's keys and values by that
  dynamic index into the pool (a Triton ref is a pointer into HBM: the pool is never copied).
  The splits are merged by XLA (``decode_attention.merge_splits``). Needs ``page`` and ``D``
  powers of two >= 16 (Triton's dot and load shapes: :func:`triton_supports`).
* Mosaic ("mosaic_tpu", "mosaic_interpret"): grid ``(B, Hkv, 1, pages)`` with the page axis
  sequential and the running softmax in VMEM scratch (``flash_attention_tpu.forward_kernel``).
  The page table is scalar-prefetched with the per-sequence page count, and the key/value index
  maps read it, so step ``t`` DMAs one page; steps past the last page repeat its index (no DMA)
  and the kernel skips them.

Forward only: decoding needs no gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from medjax.ops.pallas import blocks
from medjax.ops.pallas.blocks import KernelConfig
from medjax.ops.pallas.decode_attention import (decode_tile, fold_query_heads, looped_call,
                                                merge_splits, split_ranges, unfold_query_heads)
from medjax.ops.pallas.flash_attention_tpu import forward_kernel


def triton_supports(page: int, head_dim: int) -> bool:
    """Whether the Triton form compiles for these shapes (tiles of ``[page, D]``)."""
    return all(n >= 16 and n & (n - 1) == 0 for n in (page, head_dim))


def _paged_kernel(lo_ref, hi_ref, table_ref, q_ref, k_ref, v_ref, *refs, cfg):
    """Triton form: ``k_ref``/``v_ref`` are this KV head's whole pool ``[N, page, D]``."""
    b = pl.program_id(0)

    def page_kv(j):
        page = table_ref[b, j]
        return k_ref[page], v_ref[page]
    decode_tile(lo_ref, hi_ref, q_ref, page_kv, *refs, cfg=cfg)


def _mosaic_kernel(table_ref, lo_ref, hi_ref, *refs, cfg):
    forward_kernel(lo_ref, hi_ref, *refs, cfg=cfg)


def paged_decode_attention(q, k_pages, v_pages, page_table, kv_lengths, *, q_positions=None,
                           sliding_window=None, scale=None, num_splits=8, backend=None):
    """``ops.paged_attention``'s contract with the Pallas kernel (see module docstring).

    ``num_splits``: chunks of each sequence's visible pages run in parallel (Triton form)."""
    backend = backend or blocks.default_backend()
    B, T, Hq, D = q.shape
    N, Hkv, page, _ = k_pages.shape
    P = page_table.shape[1]
    if backend == "triton" and not triton_supports(page, D):
        raise ValueError(f"the Triton paged kernel needs page size and head_dim powers of two "
                         f">= 16; got page {page}, head_dim {D} (use the XLA path)")
    kv_grid = backend in blocks.KV_GRID_BACKENDS
    rows = (Hq // Hkv) * T
    Rp = max(8 if kv_grid else 16, pl.next_power_of_2(rows))
    kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    if q_positions is None:
        q_positions = kv_lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]
    q_pos = jnp.asarray(q_positions, jnp.int32).reshape(B, T)
    kv_pos = jnp.broadcast_to(jnp.arange(P * page, dtype=jnp.int32), (B, P * page))
    row_pos, row_seg, kv_pos, kv_seg = blocks.padded_metadata(
        jnp.tile(q_pos, (1, Hq // Hkv)), jnp.zeros((B, rows), jnp.int32), kv_pos,
        jnp.zeros((B, P * page), jnp.int32), kv_lengths, Rp, P * page)
    window = None if sliding_window is None else int(sliding_window)
    cfg = KernelConfig(scale=float(D ** -0.5 if scale is None else scale), causal=True,
                       window=window, masked=True, block_q=Rp, block_k=page, backend=backend,
                       heads_first=True, fp32=q.dtype == jnp.float32)
    table = jnp.clip(jnp.asarray(page_table, jnp.int32), 0, N - 1)
    q_BKRD = fold_query_heads(q, Hkv, Rp)
    cost = blocks.attention_cost(batch=B, heads=Hkv, q_rows=Rp, keys=P * page, head_dim=D,
                                 causal=False, window=window, passes=2,
                                 bytes_accessed=2 * B * P * page * Hkv * D * k_pages.dtype.itemsize)
    metadata = (row_pos[:, :, None], row_seg[:, :, None], kv_pos[:, None, :], kv_seg[:, None, :])
    if not kv_grid:
        visible = blocks.block_visibility(row_pos, row_seg, kv_pos, kv_seg, block_q=Rp,
                                          block_k=page, causal=True, window=window)[:, 0]
        splits = max(1, min(num_splits, P))
        lo, hi = split_ranges(visible, splits)
        pool_spec = pl.BlockSpec((N, None, page, D), lambda b, h, s: (0, h, 0, 0))
        out_shape = [jax.ShapeDtypeStruct((B, Hkv, splits, Rp, D), jnp.float32),
                     jax.ShapeDtypeStruct((B, Hkv, splits, Rp, 1), jnp.float32)]
        o_parts, lse_parts = looped_call(
            _paged_kernel, cfg, (lo, hi, table, q_BKRD, k_pages, v_pages, *metadata), out_shape,
            cost, kv_spec=pool_spec, num_tables=3, name="medjax_paged_decode")
        return merge_splits(o_parts, lse_parts, T, Hq, q.dtype)
    out = _mosaic_call(cfg, table, kv_lengths, q_BKRD, k_pages, v_pages, metadata, cost)
    return unfold_query_heads(out[:, :, 0], T, Hq, q.dtype)


def _mosaic_call(cfg, table, kv_lengths, q_BKRD, k_pages, v_pages, metadata, cost):
    """Grid ``(B, Hkv, 1, P)``: the index maps read the scalar-prefetched page table."""
    B, Hkv, Rp, D = q_BKRD.shape
    page, P = cfg.block_k, table.shape[1]
    lo = jnp.zeros((B, 1), jnp.int32)
    hi = jnp.minimum(-(-kv_lengths // page), P)[:, None]
    row_pos, row_seg, kv_pos, kv_seg = metadata
    step = lambda b, t, lo, hi: blocks.clamped_block(lo, hi, b, 0, t)   # noqa: E731
    kv_spec = pl.BlockSpec((None, None, page, D),
                           lambda b, h, s, t, tab, lo, hi: (tab[b, step(b, t, lo, hi)], h, 0, 0))
    # key metadata [B, P, 1, page]: a block's last two dims equal the array's (Mosaic tiling)
    key_spec = pl.BlockSpec((None, None, 1, page),
                            lambda b, h, s, t, tab, lo, hi: (b, step(b, t, lo, hi), 0, 0))
    row_spec = pl.BlockSpec((None, Rp, 1), lambda b, h, s, t, tab, lo, hi: (b, 0, 0))
    q_spec = pl.BlockSpec((None, None, Rp, D), lambda b, h, s, t, tab, lo, hi: (b, h, 0, 0))
    out_spec = lambda last: pl.BlockSpec((None, None, None, Rp, last),   # noqa: E731
                                         lambda b, h, s, t, tab, lo, hi: (b, h, s, 0, 0))
    from jax.experimental.pallas import tpu as pltpu
    out, _ = blocks.pallas_call(
        functools.partial(_mosaic_kernel, cfg=cfg), cfg, grid=(B, Hkv, 1, P),
        num_scalar_prefetch=3, sequential_axes=1,
        in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec, key_spec, key_spec],
        out_specs=[out_spec(D), out_spec(1)],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, 1, Rp, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, 1, Rp, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((Rp, 1), jnp.float32), pltpu.VMEM((Rp, 1), jnp.float32),
                        pltpu.VMEM((Rp, D), jnp.float32)],
        cost=cost, head_dim=D, name="medjax_paged_decode",
    )(table, lo, hi, q_BKRD, k_pages, v_pages, row_pos, row_seg,
      kv_pos.reshape(B, P, 1, page), kv_seg.reshape(B, P, 1, page))
    return out
