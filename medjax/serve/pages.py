"""The paged KV cache: a fixed pool of pages per layer, a page table per sequence.

Every layer holds ``k/v [num_pages, Hkv, page_size, D]``; sequence ``b`` of a batch owns the
pages ``page_table[b]`` in order (position ``p`` lives in page ``page_table[b, p // page_size]``
at slot ``p % page_size``; the layout of ``ops.paged_attention``). The pool is allocated once,
sized from a memory budget, so the server's KV memory is known before the first request. Unused
entries of a page table hold ``num_pages`` (one past the pool): writes there are dropped, and
reads never reach them (``kv_lengths`` bounds them).

``PagedKVCache`` is what ``Decoder.forward(cache=...)`` takes instead of the dense ``KVCache``
(same ``layer(i)`` / ``update(i, view)`` protocol); its layer view ``PagedLayer.attend`` writes
the new keys/values into the pages and attends: a prefill (tokens from position 0) attends to
its own fresh keys with ``ops.attention``, a decode step to the pages with
``ops.paged_attention``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from medjax.errors import ConfigError
from medjax.ops.attention import attention
from medjax.ops.paged_attention import paged_attention


@struct.dataclass
class PagedLayer:
    """One layer's pool plus the batch's page tables; ``attend`` is called by models/attention."""
    k: jax.Array                    # [N, Hkv, page, D]
    v: jax.Array
    page_table: jax.Array           # [B, P] int32
    kv_lengths: jax.Array           # [B] keys cached after this call
    prefill: bool = struct.field(pytree_node=False, default=False)

    def attend(self, q_BTHD, k_BTKD, v_BTKD, positions_BT, *, causal, sliding_window,
               implementation):
        N, page = self.k.shape[0], self.k.shape[2]
        B, T = positions_BT.shape
        real_BT = positions_BT < self.kv_lengths[:, None]
        slot = jnp.clip(positions_BT // page, 0, self.page_table.shape[1] - 1)
        page_BT = jnp.take_along_axis(self.page_table, slot, axis=1)
        page_BT = jnp.where(real_BT, page_BT, N)                    # padding: dropped
        offset_BT = positions_BT % page
        k = self.k.at[page_BT, :, offset_BT].set(k_BTKD.astype(self.k.dtype), mode="drop")
        v = self.v.at[page_BT, :, offset_BT].set(v_BTKD.astype(self.v.dtype), mode="drop")
        if self.prefill:        # positions start at 0: the fresh keys are the whole sequence
            out = attention(q_BTHD, k_BTKD, v_BTKD, causal=causal, sliding_window=sliding_window,
                            q_positions=positions_BT, kv_positions=positions_BT,
                            kv_lengths=self.kv_lengths, implementation=implementation)
        else:
            out = paged_attention(q_BTHD, k.astype(q_BTHD.dtype), v.astype(q_BTHD.dtype),
                                  self.page_table, self.kv_lengths, q_positions=positions_BT,
                                  sliding_window=sliding_window)
        return out, self.replace(k=k, v=v)


@struct.dataclass
class PagedKVCache:
    """All layers' pools (a tuple of per-layer arrays, each updated in place when donated)."""
    k: tuple
    v: tuple
    page_table: jax.Array
    kv_lengths: jax.Array
    prefill: bool = struct.field(pytree_node=False, default=False)

    def layer(self, i: int) -> PagedLayer:
        return PagedLayer(self.k[i], self.v[i], self.page_table, self.kv_lengths, self.prefill)

    def update(self, i: int, view: PagedLayer) -> "PagedKVCache":
        k, v = list(self.k), list(self.v)
        k[i], v[i] = view.k, view.v
        return self.replace(k=tuple(k), v=tuple(v))


def page_bytes(model_cfg, page_size: int, dtype) -> int:
    """Bytes of one page across all layers, keys and values."""
    return (2 * model_cfg.num_layers * page_size * model_cfg.num_kv_heads * model_cfg.head_dim
            * jnp.dtype(dtype).itemsize)


def pages_in_budget(model_cfg, page_size: int, dtype, budget_bytes: float) -> int:
    """How many pages fit in ``budget_bytes``."""
    return int(budget_bytes // page_bytes(model_cfg, page_size, dtype))


def init_pools(model_cfg, num_pages: int, page_size: int, dtype) -> tuple[tuple, tuple]:
    shape = (num_pages, model_cfg.num_kv_heads, page_size, model_cfg.head_dim)
    k = tuple(jnp.zeros(shape, dtype) for _ in range(model_cfg.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(model_cfg.num_layers))
    return k, v


class PageAllocator:
    """Host-side free list of page ids ``0 .. num_pages - 1``."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1:
            raise ConfigError(f"the KV budget holds no page (num_pages={num_pages}); raise it")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` pages, or None when fewer are free (nothing is taken then)."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
