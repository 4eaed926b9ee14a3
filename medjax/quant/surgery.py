"""Model surgery for QLoRA: quantize every projection of the decoder layers in place
(``quantize_model``), report what it saved (``QuantReport``), and turn it back to float for
merging and export (``dequantize_model``)."""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from medjax.quant.codec import storage_bytes
from medjax.quant.modules import QuantizedArray, QuantizedExperts, QuantizedLinear, QuantizedTensor
from medjax.models.moe import EXPERT_PROJECTIONS
from medjax.surgery import is_experts, is_linear, path_str, replace_module


def quantize_model(model, fmt: str, *, block: int = 64, double_quant: bool = False):
    """Quantize, in place, every Linear / Experts under ``model.model.layers`` (LoRA wrappers'
    bases included; embeddings, lm_head and norms untouched). Returns a :class:`QuantReport`."""
    from medjax.lora import LoRAExperts, LoRALinear
    report = QuantReport(fmt, block, double_quant)
    for path, module in list(nnx.iter_modules(model)):
        path = tuple(path)
        if "layers" not in path:
            continue
        target, where = module, path
        if isinstance(module, (LoRALinear, LoRAExperts)):
            target, where = module.base, path + ("base",)
        elif any(p == "base" for p in path):          # visited through its wrapper already
            continue
        if is_linear(target):
            new = QuantizedLinear(target, fmt, block=block, double_quant=double_quant)
            report.add(path_str(where), [new.weight])
        elif is_experts(target):
            new = QuantizedExperts(target, fmt, block=block, double_quant=double_quant)
            report.add(path_str(where),
                       [getattr(new, n) for n in EXPERT_PROJECTIONS])
        else:
            continue
        replace_module(model, where, new)
    if not report.tensors:
        raise ValueError("quantize_model: no Linear/Experts module found under model.layers")
    report.total_params = _total_params(model)
    report.total_bytes = _total_bytes(model)
    return report


def quant_report(model, lora_cfg) -> "QuantReport":
    """The :class:`QuantReport` of a model quantized elsewhere (e.g. while streaming in)."""
    report = QuantReport(lora_cfg.quantize, lora_cfg.quant_block, lora_cfg.double_quant)
    for path, module in nnx.iter_modules(model):
        if isinstance(module, QuantizedTensor):
            report.add(path_str(path), [module])
    report.total_params = _total_params(model)
    report.total_bytes = _total_bytes(model)
    return report


def dequantize_model(model, param_dtype=None, *, merge_adapters: bool = False):
    """Replace every quantized module by a plain one holding its dequantized weights, in place;
    ``param_dtype`` None: each module's compute dtype, the weights its forward used.

    ``merge_adapters``: a LoRA wrapper over a quantized base gets the merged weights instead
    (dequantized + ``scale * A @ B``, one matrix at a time) and is marked merged, so ``strip_lora``
    only unwraps it. The host then holds the float model plus one matrix's temporaries, never the
    dequantized stacks beside their merged copies (a 2-layer Mixtral-width export peaked at
    13.4 GiB that way)."""
    from medjax.lora import lora_modules, weight_adapters
    quantized = (QuantizedLinear, QuantizedExperts)
    for _, wrapper in lora_modules(model) if merge_adapters else ():
        if not wrapper.merged and isinstance(wrapper.base, quantized):
            wrapper.base = wrapper.base.to_float(param_dtype, dict(weight_adapters(wrapper)))
            wrapper.merged = True
    for path, module in reversed(list(nnx.iter_modules(model))):
        if isinstance(module, quantized):
            replace_module(model, tuple(path), module.to_float(param_dtype))
    return model


def _total_params(model) -> int:
    n = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return n + sum(q.n_params for _, q in nnx.iter_modules(model)
                   if isinstance(q, QuantizedTensor))


def _total_bytes(model) -> int:
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param)) + \
        jax.tree.leaves(nnx.state(model, QuantizedArray))
    return int(sum(np.dtype(v.dtype).itemsize * math.prod(v.shape) for v in leaves))


@dataclasses.dataclass
class QuantReport:
    """Bytes per parameter after quantization: quantized weights alone and the whole model."""
    fmt: str
    block: int
    double_quant: bool
    tensors: list = dataclasses.field(default_factory=list)   # (path, params, bytes)
    total_params: int = 0
    total_bytes: int = 0

    def add(self, path, qtensors):
        for q in qtensors:
            self.tensors.append((path, q.n_params, storage_bytes(q.arrays())))

    @property
    def quantized_params(self) -> int:
        return sum(t[1] for t in self.tensors)

    @property
    def quantized_bytes_per_param(self) -> float:
        return sum(t[2] for t in self.tensors) / max(self.quantized_params, 1)

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / max(self.total_params, 1)

    def summary(self) -> str:
        dq = " + double quant" if self.double_quant else ""
        blk = f", block {self.block}" if self.fmt == "nf4" else ""
        return (f"quantized {len(self.tensors)} weights ({self.fmt}{blk}{dq}): "
                f"{self.quantized_params:,} params at {self.quantized_bytes_per_param:.4f} bytes/param; "
                f"whole model incl. adapters {self.total_params:,} params, "
                f"{self.total_bytes / 2**20:.1f} MiB = {self.bytes_per_param:.4f} bytes/param")
