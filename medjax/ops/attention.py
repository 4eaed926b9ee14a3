"""Attention core: one signature, several implementations.

Shapes: q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA is handled by
grouping query heads, K/V are never repeated in memory). Mask semantics (causal, sliding window,
segment ids, positions, kv_lengths) are defined by positions; see ``medjax.ops.mask``.

Implementations:

* ``"xla"``: ``attention_reference``, the ground truth (plain XLA, fp32 softmax, O(T*S) memory).
* ``"pallas"``: medjax's own flash attention (``medjax.ops.pallas``): Triton on GPU, Mosaic on
  TPU, interpret mode on CPU; a few query tokens against a long cache take the decode kernel.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``; GPU only, bf16/fp16,
  and only masks cuDNN can express (no packed segments, no custom positions, causal only with
  T == S); anything else raises ``NotImplementedError``.
* ``"auto"``: CPU -> "xla" (interpret-mode Pallas is for tests, XLA is faster on CPU);
  GPU -> "cudnn" when it can express the call, else "pallas" (packed segments, decode with
  per-sequence positions, fp32); TPU -> "pallas".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medjax.ops.mask import attention_mask, split_segments

_IMPLEMENTATIONS = ("auto", "xla", "pallas", "cudnn")
_DECODE_MAX_QUERIES = 16

__all__ = ["attention", "attention_reference", "attention_mask", "cudnn_supports",
           "resolve_implementation"]


def attention_reference(q, k, v, *, causal=True, sliding_window=None, segment_ids=None,
                        q_positions=None, kv_positions=None, kv_lengths=None, scale=None):
    """Plain-XLA attention; fp32 logits and softmax, output in q's dtype. Gradients come from
    autodiff through this dense forward (``xla_attention`` shares it, with its own backward)."""
    from medjax.ops.xla_attention import dense_forward
    D, Hkv = q.shape[3], k.shape[2]
    if q.shape[2] % Hkv:
        raise ValueError(f"query heads {q.shape[2]} not divisible by kv heads {Hkv}")
    mask_BTS = attention_mask(q, k, causal=causal, sliding_window=sliding_window,
                              segment_ids=segment_ids, q_positions=q_positions,
                              kv_positions=kv_positions, kv_lengths=kv_lengths)
    return dense_forward(D ** -0.5 if scale is None else scale, q, k, v, mask_BTS)[0]


def cudnn_supports(q, k, *, causal=True, segment_ids=None, q_positions=None,
                   kv_positions=None, **_) -> str | None:
    """None if cuDNN can compute this call exactly, else the reason it cannot."""
    T, S, D = q.shape[1], k.shape[1], q.shape[3]
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bf16/fp16, got {q.dtype}"
    if D % 8 or D > 128:
        return f"head_dim {D} unsupported by cuDNN here (multiple of 8, <= 128)"
    if split_segments(segment_ids)[0] is not None:
        return "packed segment_ids are not expressible in cuDNN's API"
    if q_positions is not None or kv_positions is not None:
        return "custom positions are not expressible in cuDNN's API"
    if causal and T != S:
        return "cuDNN's causal mask is top-left aligned; medjax aligns queries to the end (T != S)"
    return None


def _cudnn_attention(q, k, v, *, causal, sliding_window, segment_ids, q_positions,
                     kv_positions, kv_lengths, scale):
    reason = cudnn_supports(q, k, causal=causal, segment_ids=segment_ids,
                            q_positions=q_positions, kv_positions=kv_positions)
    if reason:
        raise NotImplementedError(reason)
    window = None if sliding_window is None else (int(sliding_window) - 1, 0)
    lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        key_value_seq_lengths=lengths,
                                        local_window_size=window, implementation="cudnn")


def resolve_implementation(q, k, implementation="auto", **mask_kwargs) -> str:
    """The concrete implementation "auto" stands for on this backend and call."""
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {_IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    platform = jax.default_backend()
    if platform == "gpu":
        return "cudnn" if cudnn_supports(q, k, **mask_kwargs) is None else "pallas"
    if platform == "tpu":
        return "pallas"
    return "xla"


def attention(q, k, v, *, causal=True, sliding_window=None, segment_ids=None,
              q_positions=None, kv_positions=None, kv_lengths=None, scale=None,
              implementation="auto"):
    """Dispatch to an implementation (see module docstring and ``medjax.ops.mask``)."""
    kwargs = dict(causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions, kv_lengths=kv_lengths,
                  scale=scale)
    impl = resolve_implementation(q, k, implementation, **kwargs)
    if impl == "xla":
        from medjax.ops.xla_attention import xla_attention
        return xla_attention(q, k, v, **kwargs)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, **kwargs)
    from medjax.ops.pallas import decode_attention, flash_attention
    T, S = q.shape[1], k.shape[1]
    if T <= _DECODE_MAX_QUERIES and S >= 4 * T:
        return decode_attention(q, k, v, **kwargs)
    return flash_attention(q, k, v, **kwargs)
