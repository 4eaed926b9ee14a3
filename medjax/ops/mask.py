"""Attention mask semantics shared by every implementation.

Masks are defined by positions and segment ids, never by array indices alone:

* ``causal``: a query at position p sees keys at positions <= p.
* ``sliding_window=W``: additionally ``p - kv_pos < W`` (Mistral / HF semantics).
* ``segment_ids``: ``[B, T]`` (self-attention, T == S) or a pair ``(q_seg [B,T], kv_seg [B,S])``;
  tokens attend only within their segment (packed sequences).
* ``q_positions`` / ``kv_positions``: default ``arange`` with queries aligned to the END of the
  keys (``q_pos = S - T + t``), which is what a KV-cache decode step needs.
* ``kv_lengths [B]``: keys at index >= length are ignored (ragged KV caches).
"""
from __future__ import annotations

import jax.numpy as jnp


def default_positions(q, k, q_positions=None, kv_positions=None):
    """Fill in default positions: ``(q_pos [B,T], kv_pos [B,S])`` int32."""
    B, T = q.shape[:2]
    S = k.shape[1]
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + (S - T), (B, T))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    return (jnp.asarray(q_positions, jnp.int32).reshape(B, T),
            jnp.asarray(kv_positions, jnp.int32).reshape(B, S))


def split_segments(segment_ids):
    """``segment_ids`` as ``(q_seg, kv_seg)``, or ``(None, None)``."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be [B, T] or a pair (q_seg [B,T], kv_seg [B,S])")
        return segment_ids[0], segment_ids[1]
    return segment_ids, segment_ids


def attention_mask(q, k, *, causal=True, sliding_window=None, segment_ids=None,
                   q_positions=None, kv_positions=None, kv_lengths=None):
    """Boolean mask ``[B, T, S]``: True where a query may attend to a key."""
    B, T = q.shape[:2]
    S = k.shape[1]
    qp, kp = default_positions(q, k, q_positions, kv_positions)
    mask = jnp.ones((B, T, S), dtype=bool)
    if causal:
        mask &= qp[:, :, None] >= kp[:, None, :]
    if sliding_window is not None:
        mask &= (qp[:, :, None] - kp[:, None, :]) < sliding_window
    q_seg, kv_seg = split_segments(segment_ids)
    if q_seg is not None:
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    if kv_lengths is not None:
        mask &= jnp.arange(S)[None, None, :] < kv_lengths[:, None, None]
    return mask
