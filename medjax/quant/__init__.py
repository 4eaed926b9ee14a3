"""int8 / nf4 base-weight quantization for QLoRA, dequantized on the fly inside each matmul.

Formats (weights are ``[..., in, out]``; the contracting ``in`` axis is the one blocked):

* ``int8`` — per output channel: ``scale[..., 1, out] = absmax over in / 127``, codes
  ``round(w / scale)`` in int8. 1 byte/param (+ one fp32 per channel).
* ``nf4``  — QLoRA's 4-bit NormalFloat: each block of ``block`` consecutive ``in`` rows of one
  output column (the same blocks bitsandbytes takes over HF's row-major ``[out, in]`` weight)
  is scaled by its absmax into [-1, 1] and rounded to the nearest of the 16 NF4 levels; two
  4-bit indices are packed per uint8 along ``in``. ``double_quant`` stores the fp32 absmax
  values themselves as int8 (mean removed, one fp32 scale per 256 of them), as in the QLoRA
  paper (which used 8-bit floats there; we use int8 linear codes). 0.5 + 4/64 bytes/param, or
  ~0.516 with double quant.

Forward: ``y = x @ dequantize(codes)`` in the compute dtype. The matmuls are ``custom_vjp``s
whose backward dequantizes again to form ``dx = dy @ W^T``: autodiff therefore never saves a
dequantized copy of a weight as a residual (which would cost the full bf16 model in memory),
and no gradient flows to the frozen codes. The dequantize is plain jnp, so XLA materialises
one weight at a time (a fused dequant-matmul kernel would avoid even that; not written yet).
Stacked experts go to ``medjax.ops.grouped_matmul`` as codes (:class:`QuantizedGroups`), whose
loop over experts dequantizes one expert at a time, forward and backward: never the whole
``[E, in, out]`` stack, and nothing XLA could hoist out of the micro-batch loop.

QLoRA = :func:`medjax.lora.apply_lora` first, then :func:`quantize_model`, which swaps the
``base`` of every LoRA wrapper (and every other ``Linear`` / ``Experts`` in the decoder
layers: the Mixtral router included) for :class:`QuantizedLinear` / :class:`QuantizedExperts`.
The LoRA wrappers call ``base(x)`` / ``base.project(...)``, so the adapter code is reused
unchanged. Embeddings, ``lm_head`` and norms stay in ``model.param_dtype`` (as bitsandbytes
leaves them). :func:`dequantize_model` turns quantized modules back into plain ones (for
``merge_lora`` and export).
"""
from medjax.quant.codec import (FORMATS, NF4_LEVELS, STREAM_CHUNK_ELEMENTS, QSpec, dequantize,
                                quantize, quantize_streaming, storage_bytes)
from medjax.quant.modules import (QuantizedArray, QuantizedExperts, QuantizedGroups,
                                  QuantizedLinear, QuantizedTensor, quantized_matmul)
from medjax.quant.surgery import QuantReport, dequantize_model, quant_report, quantize_model

__all__ = ["FORMATS", "NF4_LEVELS", "STREAM_CHUNK_ELEMENTS", "QSpec", "QuantReport",
           "QuantizedArray", "QuantizedExperts", "QuantizedGroups", "QuantizedLinear",
           "QuantizedTensor", "dequantize", "dequantize_model", "quant_report", "quantize",
           "quantize_model", "quantize_streaming", "quantized_matmul", "storage_bytes"]
