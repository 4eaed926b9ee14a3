"""Attention core: one signature, several implementations.

Shapes: q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA is handled by
grouping query heads, K/V are never repeated in memory). Masking is defined by positions:

* ``causal``: query at position p sees keys at positions <= p.
* ``sliding_window=W``: additionally ``p - kv_pos < W`` (Mistral / HF semantics).
* ``segment_ids``: ``[B, T]`` (self-attention, T == S) or a pair ``(q_seg [B,T], kv_seg [B,S])``;
  tokens attend only within their segment (packed sequences). Segment id 0 is padding by
  convention, but masking is purely by equality.
* ``q_positions`` / ``kv_positions``: default ``arange`` with queries aligned to the end of the
  keys (``q_pos = S - T + t``), which is what a KV-cache decode step needs.
* ``kv_lengths [B]``: keys at index >= length are ignored (ragged KV caches).

``attention_reference`` is the ground truth (plain XLA, fp32 softmax).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_IMPLEMENTATIONS = ("auto", "xla", "pallas", "cudnn")


def _positions(q, k, q_positions, kv_positions):
    B, T = q.shape[:2]
    S = k.shape[1]
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + (S - T), (B, T))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    return q_positions, kv_positions


def _split_segments(segment_ids):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        return segment_ids[0], segment_ids[1]
    return segment_ids, segment_ids


def attention_mask(q, k, *, causal=True, sliding_window=None, segment_ids=None,
                   q_positions=None, kv_positions=None, kv_lengths=None):
    """Boolean mask ``[B, T, S]``: True where a query may attend to a key."""
    B, T = q.shape[:2]
    S = k.shape[1]
    qp, kp = _positions(q, k, q_positions, kv_positions)
    mask = jnp.ones((B, T, S), dtype=bool)
    if causal:
        mask &= qp[:, :, None] >= kp[:, None, :]
    if sliding_window is not None:
        mask &= (qp[:, :, None] - kp[:, None, :]) < sliding_window
    q_seg, kv_seg = _split_segments(segment_ids)
    if q_seg is not None:
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    if kv_lengths is not None:
        mask &= jnp.arange(S)[None, None, :] < kv_lengths[:, None, None]
    return mask


def attention_reference(q, k, v, *, causal=True, sliding_window=None, segment_ids=None,
                        q_positions=None, kv_positions=None, kv_lengths=None, scale=None):
    """Plain-XLA attention; fp32 logits and softmax, output in q's dtype."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not divisible by kv heads {Hkv}")
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    q_BTKGD = q.reshape(B, T, Hkv, G, D)
    logits_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k,
                              preferred_element_type=jnp.float32) * scale
    mask_BTS = attention_mask(q, k, causal=causal, sliding_window=sliding_window,
                              segment_ids=segment_ids, q_positions=q_positions,
                              kv_positions=kv_positions, kv_lengths=kv_lengths)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, -jnp.inf)
    # Rows with no visible key (e.g. padding) produce zeros instead of NaN.
    row_max = jnp.max(logits_BKGTS, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(logits_BKGTS - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                           preferred_element_type=jnp.float32)
    return out_BTKGD.reshape(B, T, Hq, D).astype(q.dtype)


def attention(q, k, v, *, causal=True, sliding_window=None, segment_ids=None,
              q_positions=None, kv_positions=None, kv_lengths=None, scale=None,
              implementation="auto"):
    """Dispatch to an implementation (see module docstring for the mask semantics)."""
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {_IMPLEMENTATIONS}")
    kwargs = dict(causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions, kv_lengths=kv_lengths,
                  scale=scale)
    if implementation in ("auto", "xla"):
        return attention_reference(q, k, v, **kwargs)
    raise NotImplementedError(f"attention implementation {implementation!r} is not built yet")
