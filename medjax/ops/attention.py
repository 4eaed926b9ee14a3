"""Attention core: one signature, several implementations.

Shapes: q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA is handled by
grouping query heads, K/V are never repeated in memory). Mask semantics (causal, sliding window,
segment ids, positions, kv_lengths) are defined by positions; see ``medjax.ops.mask``.

Implementations:

* ``"xla"``: ``attention_reference``, the ground truth (plain XLA, fp32 softmax, O(T*S) memory).
* ``"pallas"``: medjax's own flash attention (``medjax.ops.pallas``): Triton on GPU, Mosaic on
  TPU, interpret mode on CPU; a few query tokens against a long cache take the decode kernel.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``; GPU only, bf16/fp16,
  and only masks cuDNN can express (no segment ids, no custom positions, causal only with
  T == S); anything else raises ``NotImplementedError``.
* ``"auto"``: by the platform the program is COMPILED for (``medjax.ops.target``; a step
  jitted onto TPU devices from a CPU host gets the Mosaic kernel): CPU -> "xla"
  (interpret-mode Pallas is for tests); TPU -> "pallas"; GPU -> "cudnn" for the ordinary call,
  else "pallas". The ordinary call is the one training makes on unpacked data: positions
  ``arange`` and ``[B, T]`` segment ids that are right padding (each row one segment followed
  by zeros). Positions and segment ids are arrays, so that is checked at run time: the program
  holds both kernels under a ``lax.cond``, right padding goes to cuDNN as
  ``key_value_seq_lengths`` and packed rows (several segments) take the Pallas kernel. On the
  cuDNN path query rows that are padding are not computed by the mask rule (they attend the
  row's real keys): their outputs are never scored.
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


def _static_cudnn_reason(q, k, *, causal=True, segment_ids=None, **_) -> str | None:
    """Why cuDNN cannot compute this call whatever the array VALUES are (None if it may)."""
    T, S, D = q.shape[1], k.shape[1], q.shape[3]
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bf16/fp16, got {q.dtype}"
    if D % 8 or D > 128:
        return f"head_dim {D} unsupported by cuDNN here (multiple of 8, <= 128)"
    if isinstance(segment_ids, (tuple, list)):
        return "separate query/key segment ids are not expressible in cuDNN's API"
    if causal and T != S:
        return "cuDNN's causal mask is top-left aligned; medjax aligns queries to the end (T != S)"
    return None


def cudnn_supports(q, k, *, causal=True, segment_ids=None, q_positions=None,
                   kv_positions=None, **_) -> str | None:
    """None if ``implementation="cudnn"`` can compute this call exactly, else the reason.

    Explicit cuDNN takes no segment ids or positions ("auto" checks at run time whether they
    are right padding / ``arange`` and converts them; see the module docstring)."""
    reason = _static_cudnn_reason(q, k, causal=causal, segment_ids=segment_ids)
    if reason:
        return reason
    if segment_ids is not None:
        return "segment_ids are not expressible in cuDNN's API (auto converts right padding)"
    if q_positions is not None or kv_positions is not None:
        return "custom positions are not expressible in cuDNN's API (auto checks for arange)"
    return None


def _cudnn_call(q, k, v, *, causal, sliding_window, kv_lengths, scale):
    if sliding_window is not None and sliding_window >= max(q.shape[1], k.shape[1]):
        sliding_window = None      # positions are arange here: a window this wide masks nothing
    window = None if sliding_window is None else (int(sliding_window) - 1, 0)
    lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        key_value_seq_lengths=lengths,
                                        local_window_size=window, implementation="cudnn")


def _cudnn_attention(q, k, v, *, causal, sliding_window, segment_ids, q_positions,
                     kv_positions, kv_lengths, scale):
    reason = cudnn_supports(q, k, causal=causal, segment_ids=segment_ids,
                            q_positions=q_positions, kv_positions=kv_positions)
    if reason:
        raise NotImplementedError(reason)
    return _cudnn_call(q, k, v, causal=causal, sliding_window=sliding_window,
                       kv_lengths=kv_lengths, scale=scale)


def right_padding_lengths(q, k, *, segment_ids=None, q_positions=None, kv_positions=None,
                          kv_lengths=None):
    """``(ordinary, lengths [B])``: ``ordinary`` (a traced bool) is True when cuDNN's
    causal-with-key-lengths mask equals medjax's mask on every non-padding query: each row of
    ``segment_ids`` is one segment followed by zeros (right padding, not packing), with at least
    one real token, and real tokens sit at positions ``arange``. ``lengths`` = real tokens per
    row (min'd with ``kv_lengths``)."""
    B, T = q.shape[:2]
    S = k.shape[1]
    t_T, s_S = jnp.arange(T, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32)
    ordinary = jnp.asarray(True)
    lengths = jnp.full((B,), S, jnp.int32)
    real_q = jnp.ones((B, T), bool)
    real_kv = jnp.ones((B, S), bool)
    if segment_ids is not None:
        seg_BT = jnp.asarray(segment_ids, jnp.int32)
        real_q = real_kv = seg_BT != 0
        lengths = jnp.sum(real_q, axis=1, dtype=jnp.int32)
        one_segment = jnp.where(real_q, seg_BT == seg_BT[:, :1], True)
        prefix = real_q == (t_T[None, :] < lengths[:, None])
        ordinary &= jnp.all(one_segment) & jnp.all(prefix) & jnp.all(lengths > 0)
    if q_positions is not None:
        q_pos = jnp.asarray(q_positions, jnp.int32).reshape(B, T)
        ordinary &= jnp.all(jnp.where(real_q, q_pos == t_T[None, :], True))
    if kv_positions is not None:
        kv_pos = jnp.asarray(kv_positions, jnp.int32).reshape(B, S)
        ordinary &= jnp.all(jnp.where(real_kv, kv_pos == s_S[None, :], True))
    if kv_lengths is not None:
        lengths = jnp.minimum(lengths, jnp.asarray(kv_lengths, jnp.int32))
        ordinary &= jnp.all(lengths > 0)
    return ordinary, lengths


def resolve_implementation(q, k, implementation="auto", platform=None, **mask_kwargs) -> str:
    """The implementation "auto" stands for when compiled for ``platform`` (default: the host).

    On GPU: "cudnn" (no segment ids / positions), "cudnn|pallas" (decided at run time by
    :func:`right_padding_lengths`) or "pallas"."""
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {_IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    from medjax.ops.target import host_platform
    platform = platform or host_platform()
    if platform in ("cuda", "rocm"):
        if platform == "cuda" and _static_cudnn_reason(q, k, **mask_kwargs) is None:
            return "cudnn" if cudnn_supports(q, k, **mask_kwargs) is None else "cudnn|pallas"
        return "pallas"
    if platform == "tpu":
        return "pallas"
    return "xla"


def _pallas(q, k, v, backend, **kwargs):
    from medjax.ops.pallas import decode_attention, flash_attention
    T, S = q.shape[1], k.shape[1]
    if T <= _DECODE_MAX_QUERIES and S >= 4 * T:
        return decode_attention(q, k, v, backend=backend, **kwargs)
    return flash_attention(q, k, v, backend=backend, **kwargs)


def _run(impl, platform, q, k, v, **kwargs):
    """Run ``impl``; kernels (custom calls) run per device shard of the context mesh."""
    if impl == "xla":
        from medjax.ops.xla_attention import xla_attention
        return xla_attention(q, k, v, **kwargs)
    from medjax.ops.target import per_shard
    arrays = {n: kwargs.pop(n) for n in ("segment_ids", "q_positions", "kv_positions", "kv_lengths")}
    if isinstance(arrays["segment_ids"], (tuple, list)):
        arrays["q_segment_ids"], arrays["kv_segment_ids"] = arrays.pop("segment_ids")
    arrays = {n: x for n, x in arrays.items() if x is not None}

    def local(q, k, v, q_segment_ids=None, kv_segment_ids=None, **mask):
        if q_segment_ids is not None:
            mask["segment_ids"] = (q_segment_ids, kv_segment_ids)
        full = dict(dict.fromkeys(("segment_ids", "q_positions", "kv_positions", "kv_lengths")),
                    **mask)
        return _run_kernel(impl, platform, q, k, v, **kwargs, **full)
    return per_shard(local, arrays, {"q": q, "k": k, "v": v})


def _run_kernel(impl, platform, q, k, v, **kwargs):
    from medjax.ops.pallas.blocks import backend_for
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, **kwargs)
    if impl == "pallas":
        return _pallas(q, k, v, backend_for(platform), **kwargs)
    # "cudnn|pallas": right-padded rows -> cuDNN with key lengths; anything else -> Pallas.
    ordinary, lengths = right_padding_lengths(
        q, k, segment_ids=kwargs["segment_ids"], q_positions=kwargs["q_positions"],
        kv_positions=kwargs["kv_positions"], kv_lengths=kwargs["kv_lengths"])
    cudnn = lambda q, k, v, lengths: _cudnn_call(  # noqa: E731
        q, k, v, causal=kwargs["causal"], sliding_window=kwargs["sliding_window"],
        kv_lengths=lengths, scale=kwargs["scale"])
    pallas = lambda q, k, v, lengths: _pallas(q, k, v, backend_for(platform), **kwargs)  # noqa: E731
    return jax.lax.cond(ordinary, cudnn, pallas, q, k, v, lengths)


def _cuda_can_trace_cudnn() -> bool:
    """cuDNN attention can only be traced where jaxlib has its CUDA libraries (the plugin)."""
    from jax._src.lib import cuda_versions
    return cuda_versions is not None


def attention(q, k, v, *, causal=True, sliding_window=None, segment_ids=None,
              q_positions=None, kv_positions=None, kv_lengths=None, scale=None,
              implementation="auto"):
    """Dispatch to an implementation (see module docstring and ``medjax.ops.mask``)."""
    from medjax.ops.target import on_target
    kwargs = dict(causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions, kv_lengths=kv_lengths,
                  scale=scale)
    resolve_implementation(q, k, implementation)        # validates the name

    def for_platform(platform):
        impl = resolve_implementation(q, k, implementation, platform, **kwargs)
        if impl.startswith("cudnn") and implementation == "auto" and not _cuda_can_trace_cudnn():
            impl = "pallas"        # no CUDA libraries: nothing can compile for cuda here anyway
        return _run(impl, platform, q, k, v, **kwargs)
    return on_target(for_platform)
