"""GQA self-attention module: projections + RoPE + KV cache; the core is ``medjax.ops.attention``."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from medjax.models.config import ModelConfig
from medjax.models.layers import Linear, apply_rope
from medjax.ops.attention import attention


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl="auto"):
        H, D = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, D
        self.sliding_window = cfg.sliding_window
        self.attention_impl = attention_impl
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(H, cfg.num_heads * D, logical_axes=("embed", "q_heads"), **kw)
        self.k_proj = Linear(H, cfg.num_kv_heads * D, logical_axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(H, cfg.num_kv_heads * D, logical_axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(cfg.num_heads * D, H, logical_axes=("q_heads", "embed"), **kw)

    def __call__(self, x_BTH, positions_BT, inv_freq, *, segment_ids=None, kv_cache=None):
        """Returns ``(out_BTH, (k_cache, v_cache) | None)``.

        With ``kv_cache=(k_BSKD, v_BSKD)`` the new keys/values are written at slot == position and
        the queries attend causally (by position) over the whole cache. A cache view with an
        ``attend(q, k, v, positions, **mask) -> (out, new_view)`` method stores and attends itself.
        """
        B, T, _ = x_BTH.shape
        q_BTHD = self.q_proj(x_BTH).reshape(B, T, self.num_heads, self.head_dim)
        k_BTKD = self.k_proj(x_BTH).reshape(B, T, self.num_kv_heads, self.head_dim)
        v_BTKD = self.v_proj(x_BTH).reshape(B, T, self.num_kv_heads, self.head_dim)
        q_BTHD = apply_rope(q_BTHD, positions_BT, inv_freq)
        k_BTKD = apply_rope(k_BTKD, positions_BT, inv_freq)
        kw = dict(causal=True, sliding_window=self.sliding_window, implementation=self.attention_impl)
        if kv_cache is None:
            out_BTHD = attention(q_BTHD, k_BTKD, v_BTKD, segment_ids=segment_ids,
                                 q_positions=positions_BT, kv_positions=positions_BT, **kw)
            new_cache = None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
            if hasattr(kv_cache, "attend"):        # another layout (serving's paged pool)
                out_BTHD, new_cache = kv_cache.attend(q_BTHD, k_BTKD, v_BTKD, positions_BT, **kw)
                return self.o_proj(out_BTHD.reshape(B, T, self.num_heads * self.head_dim)), new_cache
            k_cache, v_cache = kv_cache
            b_idx = jnp.arange(B)[:, None]
            k_cache = k_cache.at[b_idx, positions_BT].set(k_BTKD.astype(k_cache.dtype), mode="drop")
            v_cache = v_cache.at[b_idx, positions_BT].set(v_BTKD.astype(v_cache.dtype), mode="drop")
            S = k_cache.shape[1]
            kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=positions_BT.dtype), (B, S))
            out_BTHD = attention(q_BTHD, k_cache.astype(q_BTHD.dtype), v_cache.astype(q_BTHD.dtype),
                                 q_positions=positions_BT, kv_positions=kv_pos,
                                 kv_lengths=jnp.max(positions_BT, axis=1) + 1, **kw)
            new_cache = (k_cache, v_cache)
        return self.o_proj(out_BTHD.reshape(B, T, self.num_heads * self.head_dim)), new_cache
