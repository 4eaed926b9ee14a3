"""Dense XLA attention with a hand-written backward (``jax.custom_vjp``), causal blocks skipped.

Same math as ``attention_reference`` (fp32 logits and softmax, GQA by grouping query heads,
rows with no visible key give zeros), made fast on CPU by three things:

* every matmul is written with its large operand (the ``[T, S]`` probabilities) in the layout
  the dot wants, so only the small ``[T, D]`` operands are ever transposed;
* the backward is the closed form ``dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O))`` instead of autodiff
  through the masking and the max/where/divide of the softmax;
* self-attention over one sequence (``T == S``, the same positions for queries and keys) is
  cut into query blocks, and block ``i`` only looks at the keys ``[0, end_i)``: keys after the
  block are in the future, so their fully masked score tiles are never computed (about 40% of
  the work at 4 blocks). The full mask is still applied inside the computed tiles.

Together about 4× faster forward+backward than plain autodiff on CPU at SmolLM2 shapes
(``python -m medjax.bench attention``).

The block skip relies on what a token sequence guarantees: within one segment, positions
increase along the row, so a visible key never comes after its query. Calls that pass
different query and key positions (a KV cache) use the dense path.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from medjax.ops.mask import attention_mask

MIN_BLOCK = 128    # query block for the causal skip; shorter sequences stay dense
MAX_BLOCKS = 8     # more blocks: less masked work, but more ops to compile


def causal_blocks(T: int) -> list[tuple[int, int]]:
    """Query blocks ``[(start, end), ...]`` covering ``[0, T)``, at most ``MAX_BLOCKS``."""
    n = max(1, min(MAX_BLOCKS, T // MIN_BLOCK))
    bounds = [round(i * T / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def xla_attention(q, k, v, *, causal=True, sliding_window=None, segment_ids=None,
                  q_positions=None, kv_positions=None, kv_lengths=None, scale=None):
    B, T, Hq, D = q.shape
    if Hq % k.shape[2]:
        raise ValueError(f"query heads {Hq} not divisible by kv heads {k.shape[2]}")
    mask_BTS = attention_mask(q, k, causal=causal, sliding_window=sliding_window,
                              segment_ids=segment_ids, q_positions=q_positions,
                              kv_positions=kv_positions, kv_lengths=kv_lengths)
    scale = D ** -0.5 if scale is None else scale
    self_attention = causal and T == k.shape[1] and q_positions is kv_positions
    if not self_attention or T < 2 * MIN_BLOCK:
        return _attention(scale, q, k, v, mask_BTS)
    return jnp.concatenate([_attention(scale, q[:, a:b], k[:, :b], v[:, :b], mask_BTS[:, a:b, :b])
                            for a, b in causal_blocks(T)], axis=1)


def _heads_first(x_BTHD, K):
    """``[B, T, K*G, D] → [B, K, G, T, D]`` (query-shaped tensors grouped by their KV head)."""
    B, T, H, D = x_BTHD.shape
    return jnp.transpose(x_BTHD.reshape(B, T, K, H // K, D), (0, 2, 3, 1, 4))


def _tokens_first(x_BKGTD):
    B, K, G, T, D = x_BKGTD.shape
    return jnp.transpose(x_BKGTD, (0, 3, 1, 2, 4)).reshape(B, T, K * G, D)


def dense_forward(scale, q, k, v, mask_BTS):
    """``(out, P)``: masked fp32 softmax attention; rows with no visible key give zeros.

    ``P`` is ``[B, K, G, T, S]`` (queries grouped by their KV head)."""
    K = k.shape[2]
    f32 = jnp.float32
    s_BKGTS = jnp.einsum("bkgtd,bkds->bkgts", _heads_first(q, K), jnp.transpose(k, (0, 2, 3, 1)),
                         preferred_element_type=f32) * scale
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, -jnp.inf)
    m = jnp.max(s_BKGTS, axis=-1, keepdims=True)
    p_BKGTS = jnp.exp(s_BKGTS - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    p_BKGTS = p_BKGTS * (1.0 / jnp.where(denom == 0, 1.0, denom))
    o_BKGTD = jnp.einsum("bkgts,bksd->bkgtd", p_BKGTS.astype(v.dtype), jnp.transpose(v, (0, 2, 1, 3)),
                         preferred_element_type=f32)
    return _tokens_first(o_BKGTD).astype(q.dtype), p_BKGTS


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(scale, q, k, v, mask_BTS):
    return dense_forward(scale, q, k, v, mask_BTS)[0]


def _attention_fwd(scale, q, k, v, mask_BTS):
    out, p_BKGTS = dense_forward(scale, q, k, v, mask_BTS)
    return out, (q, k, v, p_BKGTS, out)     # P carries the mask: masked entries are 0


def _attention_bwd(scale, res, do):
    q, k, v, p_BKGTS, out = res
    K = k.shape[2]
    f32 = jnp.float32
    do_BKGTD = _heads_first(do.astype(f32), K)
    # dV and dK come out as [B, K, D, S]: the big P / dS stay the right-hand operand.
    dv_BKDS = jnp.einsum("bkgtd,bkgts->bkds", do_BKGTD, p_BKGTS)
    dp_BKGTS = jnp.einsum("bkgtd,bkds->bkgts", do_BKGTD, jnp.transpose(v.astype(f32), (0, 2, 3, 1)))
    delta_BKGT1 = jnp.sum(do_BKGTD * _heads_first(out.astype(f32), K), axis=-1, keepdims=True)
    ds_BKGTS = p_BKGTS * (dp_BKGTS - delta_BKGT1) * scale
    dq_BKGTD = jnp.einsum("bkgts,bksd->bkgtd", ds_BKGTS, jnp.transpose(k.astype(f32), (0, 2, 1, 3)))
    dk_BKDS = jnp.einsum("bkgtd,bkgts->bkds", _heads_first(q.astype(f32), K), ds_BKGTS)
    to_BSKD = lambda x: jnp.transpose(x, (0, 3, 1, 2))  # noqa: E731
    return (_tokens_first(dq_BKGTD).astype(q.dtype), to_BSKD(dk_BKDS).astype(k.dtype),
            to_BSKD(dv_BKDS).astype(v.dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)
