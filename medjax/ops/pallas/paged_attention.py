"""Paged decode attention in Pallas: the decode kernel's blocked form with pages as key blocks.

Built on ``decode_attention``'s TPU form: the G query heads sharing a KV head are folded into the
rows of one tile, the grid is ``(B, Hkv, 1, pages)`` with the page axis sequential and the
running softmax in VMEM scratch (``flash_attention_tpu.forward_kernel``). The page table is
scalar-prefetched with the per-sequence page count, and the key/value index maps read it: step
``t`` of sequence ``b`` DMAs page ``page_table[b, t]`` of head ``h`` (a ``[page, D]`` block of the
heads-first pool ``[N, Hkv, page, D]``). Steps past a sequence's last page repeat its index, so
no DMA is issued for them, and the kernel skips them.

Backends: "mosaic_tpu" (compiled for TPU; checked compile-only with libtpu) and
"mosaic_interpret"/"interpret" (the same program in interpret mode on CPU, for tests). Pallas'
Triton backend has no scalar prefetch: a GPU kernel (a loop over the table inside the program)
is not written yet, so on GPU ``ops.paged_attention`` takes its XLA path (docs/SERVE.md).
Forward only: decoding needs no gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from medjax.ops.pallas import blocks
from medjax.ops.pallas.blocks import KernelConfig
from medjax.ops.pallas.flash_attention_tpu import forward_kernel


def _kernel(table_ref, lo_ref, hi_ref, *refs, cfg):
    forward_kernel(lo_ref, hi_ref, *refs, cfg=cfg)


def paged_decode_attention(q, k_pages, v_pages, page_table, kv_lengths, *, q_positions=None,
                           sliding_window=None, scale=None, backend=None):
    """``ops.paged_attention``'s contract with the Pallas kernel (see module docstring)."""
    backend = backend or blocks.default_backend()
    if backend == "triton":
        raise NotImplementedError("no Triton paged kernel yet: ops.paged_attention takes the XLA "
                                  "path on GPU")
    if backend == "interpret":
        backend = "mosaic_interpret"
    B, T, Hq, D = q.shape
    N, Hkv, page, _ = k_pages.shape
    P = page_table.shape[1]
    G = Hq // Hkv
    rows = G * T
    Rp = max(8, pl.next_power_of_2(rows))
    kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    if q_positions is None:
        q_positions = kv_lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]
    q_pos = jnp.asarray(q_positions, jnp.int32).reshape(B, T)
    kv_pos = jnp.broadcast_to(jnp.arange(P * page, dtype=jnp.int32), (B, P * page))
    row_pos, row_seg, kv_pos, kv_seg = blocks.padded_metadata(
        jnp.tile(q_pos, (1, G)), jnp.zeros((B, rows), jnp.int32), kv_pos,
        jnp.zeros((B, P * page), jnp.int32), kv_lengths, Rp, P * page)
    cfg = KernelConfig(scale=float(D ** -0.5 if scale is None else scale), causal=True,
                       window=None if sliding_window is None else int(sliding_window), masked=True,
                       block_q=Rp, block_k=page, backend=backend, heads_first=True,
                       fp32=q.dtype == jnp.float32)
    table = jnp.clip(jnp.asarray(page_table, jnp.int32), 0, N - 1)
    lo = jnp.zeros((B, 1), jnp.int32)
    hi = jnp.minimum(-(-kv_lengths // page), P)[:, None]
    q_BKRD = q.reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, rows, D)
    q_BKRD = blocks.pad_axis(q_BKRD, 2, Rp)

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
    cost = blocks.attention_cost(batch=B, heads=Hkv, q_rows=Rp, keys=P * page, head_dim=D,
                                 causal=False, window=sliding_window, passes=2,
                                 bytes_accessed=2 * B * P * page * Hkv * D * k_pages.dtype.itemsize)
    out, _ = blocks.pallas_call(
        functools.partial(_kernel, cfg=cfg), cfg, grid=(B, Hkv, 1, P),
        num_scalar_prefetch=3, sequential_axes=1,
        in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec, key_spec, key_spec],
        out_specs=[out_spec(D), out_spec(1)],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, 1, Rp, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, 1, Rp, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((Rp, 1), jnp.float32), pltpu.VMEM((Rp, 1), jnp.float32),
                        pltpu.VMEM((Rp, D), jnp.float32)],
        cost=cost, head_dim=D, name="medjax_paged_decode",
    )(table, lo, hi, q_BKRD, k_pages, v_pages, row_pos[:, :, None], row_seg[:, :, None],
      kv_pos.reshape(B, P, 1, page), kv_seg.reshape(B, P, 1, page))
    out = out[:, :, 0, :rows].reshape(B, Hkv, G, T, D).transpose(0, 3, 1, 2, 4)
    return out.reshape(B, T, Hq, D).astype(q.dtype)
