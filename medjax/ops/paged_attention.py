"""Attention of a few query tokens against a paged KV cache (serving's decode step).

The cache of one layer is a pool of fixed-size pages ``k_pages/v_pages [N, Hkv, page, D]``
(heads first: a kernel block is one page of one KV head); sequence ``b`` owns the pages
``page_table[b, :]`` in order, so its key at position ``p`` is
``k_pages[page_table[b, p // page], :, p % page]``. ``kv_lengths [B]`` counts each sequence's keys
(entries of ``page_table`` past them are never read as keys: any index is fine there).

``paged_attention(q[B,T,Hq,D], k_pages, v_pages, page_table[B,P], kv_lengths[B], *,
q_positions=None, sliding_window=None, scale=None, implementation="auto")`` -> ``[B,T,Hq,D]``.
Queries attend causally by position (default: the last T positions of each sequence).

* ``"xla"``: blocks of ``pages_per_block`` pages are gathered and folded into an online softmax
  by a ``while`` loop whose trip count is the batch's longest sequence, so the work follows the
  tokens actually cached, not the page table's width, and no length recompiles.
* ``"pallas"``: the kernel of ``medjax.ops.pallas.paged_attention`` for the platform compiled
  for: on TPU (Mosaic) the page table is scalar-prefetched and picks each key block; on GPU
  (Triton) each program loops over its sequence's pages, loading the page index from the table
  and then that page; on CPU the Triton form in interpret mode (tests).
* ``"auto"``: by the platform compiled for (``medjax.ops.target``): TPU -> "pallas"; GPU ->
  "pallas" when the Triton kernel supports the shapes (page size and head_dim powers of two
  >= 16), else "xla"; CPU -> "xla".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_IMPLEMENTATIONS = ("auto", "xla", "pallas")
_MASKED = -1e30


def _query_positions(q_positions, kv_lengths, T):
    if q_positions is not None:
        return jnp.asarray(q_positions, jnp.int32).reshape(kv_lengths.shape[0], T)
    return kv_lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]


def paged_attention_xla(q, k_pages, v_pages, page_table, kv_lengths, *, q_positions=None,
                        sliding_window=None, scale=None, pages_per_block=8):
    """Plain-XLA paged attention (online softmax over gathered page blocks); fp32 softmax."""
    B, T, Hq, D = q.shape
    N, Hkv, page, _ = k_pages.shape
    G = Hq // Hkv
    k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
    kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    q_pos_BT = _query_positions(q_positions, kv_lengths, T)
    scale = D ** -0.5 if scale is None else scale
    ppb = max(1, min(pages_per_block, page_table.shape[1]))
    width = -(-page_table.shape[1] // ppb) * ppb
    table = jnp.pad(jnp.asarray(page_table, jnp.int32), ((0, 0), (0, width - page_table.shape[1])))
    table = jnp.clip(table, 0, N - 1)
    block = ppb * page
    q_BKGTD = (q.astype(jnp.float32) * scale).reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4)

    def body(j, carry):
        m, l, acc = carry
        pages_BJ = jax.lax.dynamic_slice_in_dim(table, j * ppb, ppb, axis=1)
        k_BSKD = k_pages[pages_BJ].swapaxes(2, 3).reshape(B, block, Hkv, D).astype(jnp.float32)
        v_BSKD = v_pages[pages_BJ].swapaxes(2, 3).reshape(B, block, Hkv, D).astype(jnp.float32)
        s = jnp.einsum("bkgtd,bskd->bkgts", q_BKGTD, k_BSKD)
        kv_pos_S = j * block + jnp.arange(block, dtype=jnp.int32)
        visible = ((kv_pos_S[None, None, :] < kv_lengths[:, None, None])
                   & (kv_pos_S[None, None, :] <= q_pos_BT[:, :, None]))
        if sliding_window is not None:
            visible &= q_pos_BT[:, :, None] - kv_pos_S[None, None, :] < sliding_window
        visible = visible[:, None, None]                                     # [B,1,1,T,S]
        s = jnp.where(visible, s, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1, keepdims=True)
        acc = acc * correction + jnp.einsum("bkgts,bskd->bkgtd", p, v_BSKD)
        return m_new, l, acc

    init = (jnp.full((B, Hkv, G, T, 1), _MASKED, jnp.float32),
            jnp.zeros((B, Hkv, G, T, 1), jnp.float32),
            jnp.zeros((B, Hkv, G, T, D), jnp.float32))
    n_blocks = jnp.minimum(-(-jnp.max(kv_lengths) // block), width // ppb)
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.where(l == 0, 1.0, l)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D).astype(q.dtype)


def resolve_implementation(implementation: str, platform: str, *, page_size: int,
                           head_dim: int) -> str:
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown paged attention implementation {implementation!r}; "
                         f"choose one of {_IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    if platform == "tpu":
        return "pallas"
    if platform in ("cuda", "rocm"):
        from medjax.ops.pallas.paged_attention import triton_supports
        return "pallas" if triton_supports(page_size, head_dim) else "xla"
    return "xla"


def paged_attention(q, k_pages, v_pages, page_table, kv_lengths, *, q_positions=None,
                    sliding_window=None, scale=None, implementation="auto"):
    """Dispatch by the platform compiled for (see module docstring)."""
    from medjax.ops.target import on_target
    shapes = dict(page_size=k_pages.shape[2], head_dim=q.shape[-1])
    resolve_implementation(implementation, "cpu", **shapes)        # validates the name
    kwargs = dict(q_positions=q_positions, sliding_window=sliding_window, scale=scale)

    def for_platform(platform):
        if resolve_implementation(implementation, platform, **shapes) == "xla":
            return paged_attention_xla(q, k_pages, v_pages, page_table, kv_lengths, **kwargs)
        from medjax.ops.pallas.blocks import backend_for
        from medjax.ops.pallas.paged_attention import paged_decode_attention
        return paged_decode_attention(q, k_pages, v_pages, page_table, kv_lengths,
                                      backend=backend_for(platform), **kwargs)
    return on_target(for_platform)
