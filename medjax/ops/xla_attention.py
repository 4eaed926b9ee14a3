"""Dense XLA attention with a hand-written backward (``jax.custom_vjp``).

Same math as ``attention_reference`` (fp32 logits and softmax, GQA by grouping query heads,
rows with no visible key give zeros), but the backward is the closed form
``dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O))`` instead of autodiff through the masking and the
max/where/divide of the softmax: about 1.9× faster forward+backward on CPU at SmolLM2 shapes.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from medjax.ops.mask import attention_mask


def xla_attention(q, k, v, *, causal=True, sliding_window=None, segment_ids=None,
                  q_positions=None, kv_positions=None, kv_lengths=None, scale=None):
    B, T, Hq, D = q.shape
    if Hq % k.shape[2]:
        raise ValueError(f"query heads {Hq} not divisible by kv heads {k.shape[2]}")
    mask_BTS = attention_mask(q, k, causal=causal, sliding_window=sliding_window,
                              segment_ids=segment_ids, q_positions=q_positions,
                              kv_positions=kv_positions, kv_lengths=kv_lengths)
    return _attention(D ** -0.5 if scale is None else scale, q, k, v, mask_BTS)


def dense_forward(scale, q, k, v, mask_BTS):
    """``(out, P)``: masked fp32 softmax attention; rows with no visible key give zeros."""
    B, T, Hq, D = q.shape
    K = k.shape[2]
    q_BTKGD = q.reshape(B, T, K, Hq // K, D)
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k, preferred_element_type=jnp.float32) * scale
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, -jnp.inf)
    m = jnp.max(s_BKGTS, axis=-1, keepdims=True)
    p_BKGTS = jnp.exp(s_BKGTS - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    p_BKGTS = p_BKGTS / jnp.where(denom == 0, 1.0, denom)
    o_BTKGD = jnp.einsum("bkgts,bskd->btkgd", p_BKGTS.astype(v.dtype), v,
                         preferred_element_type=jnp.float32)
    return o_BTKGD.reshape(B, T, Hq, D).astype(q.dtype), p_BKGTS


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(scale, q, k, v, mask_BTS):
    return dense_forward(scale, q, k, v, mask_BTS)[0]


def _attention_fwd(scale, q, k, v, mask_BTS):
    out, p_BKGTS = dense_forward(scale, q, k, v, mask_BTS)
    return out, (q, k, v, p_BKGTS, out, mask_BTS)


def _attention_bwd(scale, res, do):
    q, k, v, p_BKGTS, out, mask_BTS = res
    B, T, Hq, D = q.shape
    K = k.shape[2]
    G = Hq // K
    f32 = jnp.float32
    do_BTKGD = do.reshape(B, T, K, G, D).astype(f32)
    o_BTKGD = out.reshape(B, T, K, G, D).astype(f32)
    dv = jnp.einsum("bkgts,btkgd->bskd", p_BKGTS, do_BTKGD)
    dp_BKGTS = jnp.einsum("btkgd,bskd->bkgts", do_BTKGD, v.astype(f32))
    delta_BKGT = jnp.einsum("btkgd,btkgd->bkgt", do_BTKGD, o_BTKGD)
    ds_BKGTS = p_BKGTS * (dp_BKGTS - delta_BKGT[..., None]) * scale
    dq = jnp.einsum("bkgts,bskd->btkgd", ds_BKGTS, k.astype(f32)).reshape(B, T, Hq, D)
    dk = jnp.einsum("bkgts,btkgd->bskd", ds_BKGTS, q.reshape(B, T, K, G, D).astype(f32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
