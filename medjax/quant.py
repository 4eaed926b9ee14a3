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
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medjax.models.stack import LAYERS_AXIS, num_stacked
from medjax.ops.grouped_matmul import GroupWeights, grouped_matmul

# The 16 NF4 levels (quantiles of N(0, 1) normalised to [-1, 1], with an exact zero), as
# published with QLoRA / bitsandbytes.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
NF4_MAX_HALF_GAP = float(np.max(np.diff(NF4_LEVELS)) / 2)   # worst rounding error / absmax
FORMATS = ("int8", "nf4")
DOUBLE_QUANT_GROUP = 256


class QuantizedArray(nnx.Variable):
    """Frozen quantized storage (codes / scales); never an ``nnx.Param``, so never trained."""


@dataclasses.dataclass(frozen=True)
class QSpec:
    """Static description of one quantized weight (hashable: a jit/custom_vjp static arg)."""
    fmt: str
    shape: tuple          # the float weight's shape [..., in, out]
    block: int            # nf4 block along `in` (int8: the whole `in` axis)
    double_quant: bool
    dtype: str            # compute dtype of the dequantized weight

    @property
    def n_params(self) -> int:
        return math.prod(self.shape)


# ------------------------------------------------------------------------------ formats
def nf4_block(n_in: int, block: int) -> int:
    """The block actually used: ``block`` when it divides ``n_in``, else the largest even divisor."""
    b = math.gcd(n_in, block)
    if b % 2:
        raise ValueError(f"nf4 needs an even contracting dim, got in={n_in}")
    return b


def quantize(w, fmt: str, *, block: int = 64, double_quant: bool = False, dtype=jnp.bfloat16):
    """``(QSpec, {name: array})`` for a float weight ``w [..., in, out]``."""
    if fmt not in FORMATS:
        raise ValueError(f"quantization format {fmt!r} is not one of {FORMATS}")
    w = jnp.asarray(w, jnp.float32)
    *lead, n_in, n_out = w.shape
    if fmt == "int8":
        scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
        scale = jnp.where(scale == 0, 1.0, scale)
        codes = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
        spec = QSpec("int8", tuple(w.shape), n_in, False, jnp.dtype(dtype).name)
        return spec, {"codes": codes, "scales": scale}
    b = nf4_block(n_in, block)
    w_blocks = w.reshape(*lead, n_in // b, b, n_out)
    absmax = jnp.max(jnp.abs(w_blocks), axis=-2)                          # [..., in/b, out]
    absmax = jnp.where(absmax == 0, 1.0, absmax)
    normed = w_blocks / absmax[..., None, :]
    # nearest level by binary search over the 15 midpoints (ties go to the lower level, as an
    # argmin would): no [..., 16] distance temporary, which costs 64 bytes per parameter
    idx = jnp.searchsorted(NF4_MIDPOINTS, normed, side="left", method="scan").astype(jnp.uint8)
    idx = idx.reshape(*lead, n_in // 2, 2, n_out)
    packed = idx[..., 0, :] | (idx[..., 1, :] << 4)                     # [..., in/2, out]
    spec = QSpec("nf4", tuple(w.shape), b, double_quant, jnp.dtype(dtype).name)
    arrays = {"codes": packed}
    if double_quant:
        arrays.update(_quantize_scales(absmax))
    else:
        arrays["scales"] = absmax
    return spec, arrays


def _dq_group(per_lead: int) -> int:
    """Second-level group of a stacked ``[E, ...]`` weight: the largest divisor of one expert's
    scale count up to ``DOUBLE_QUANT_GROUP``, so each expert owns whole groups and the expert dim
    can be split across devices (expert parallelism); 0 when no divisor >= 32 exists."""
    group = max(d for d in range(1, min(DOUBLE_QUANT_GROUP, per_lead) + 1) if per_lead % d == 0)
    return group if group >= 32 else 0


@jax.jit
def _quantize_scales(absmax):
    """Second-level quantization of the nf4 absmax values ``[..., in/b, out]``: int8 codes around
    their mean, one fp32 scale per group. A 2-D weight's values are grouped flat
    (``[G, 256]``); a stacked weight's per leading index (``[E, G, group]``, see :func:`_dq_group`).
    Jitted: one compiled program per shape, where op-by-op dispatch compiled and cached one per
    op (measured: 53 MiB less host RSS for the QLoRA load in tests/hf/test_load_memory.py)."""
    *lead, a, b = absmax.shape
    offset = jnp.mean(absmax)
    group = _dq_group(a * b) if lead else 0
    if group:
        groups = (absmax - offset).reshape(*lead, a * b // group, group)
    else:
        flat = absmax.reshape(-1) - offset
        pad = (-flat.size) % DOUBLE_QUANT_GROUP
        groups = jnp.pad(flat, (0, pad)).reshape(-1, DOUBLE_QUANT_GROUP)
    s2 = jnp.max(jnp.abs(groups), axis=-1, keepdims=True) / 127.0
    s2 = jnp.where(s2 == 0, 1.0, s2)
    q = jnp.clip(jnp.round(groups / s2), -127, 127).astype(jnp.int8)
    return {"scale_codes": q, "scale_scales": s2, "scale_offset": offset}


def _nf4_scales(spec: QSpec, arrays):
    """The first-level scales ``[..., in/b, out]`` of the codes held (all experts, or the shard of
    them one device holds under expert parallelism)."""
    *lead, n_in, n_out = spec.shape
    local = arrays["codes"].shape[:-2]
    if not spec.double_quant:
        return arrays["scales"]
    values = arrays["scale_codes"].astype(jnp.float32) * arrays["scale_scales"]
    per = (n_in // spec.block) * n_out
    if lead and values.ndim == len(lead) + 2:                       # grouped per leading index
        flat = values.reshape(*local, -1)
    elif tuple(local) == tuple(lead):                               # grouped flat
        flat = values.reshape(-1)[:math.prod(lead) * per]
    else:
        raise NotImplementedError(
            f"double-quant scales of a {spec.shape} weight are grouped across experts; a shard of "
            f"its experts ({tuple(local)}) cannot read them: set lora.double_quant=false")
    return (flat + arrays["scale_offset"]).reshape(*local, n_in // spec.block, n_out)


def dequantize(spec: QSpec, arrays, dtype=None, *, expert: bool = False):
    """The float weight ``[..., in, out]`` in ``dtype`` (default: the spec's compute dtype).
    ``expert=True``: ``arrays`` hold one expert of a stacked ``[E, in, out]`` spec, whose
    scales are already plain (:func:`_expert_arrays`); the result is ``[in, out]``."""
    dtype = jnp.dtype(dtype or spec.dtype)
    if spec.fmt == "int8":
        return (arrays["codes"].astype(jnp.float32) * arrays["scales"]).astype(dtype)
    *_, n_in, n_out = spec.shape
    packed = arrays["codes"]
    lead = packed.shape[:-2]          # all experts, or one device's shard of them
    idx = jnp.stack([packed & 0xF, packed >> 4], axis=-2).reshape(*lead, n_in, n_out)
    values = jnp.asarray(NF4_LEVELS)[idx.astype(jnp.int32)]
    values = values.reshape(*lead, n_in // spec.block, spec.block, n_out)
    scales = arrays["scales"] if expert else _nf4_scales(spec, arrays)
    return (values * scales[..., None, :]).reshape(*lead, n_in, n_out).astype(dtype)


# ------------------------------------------------------------------------------ streaming
STREAM_CHUNK_ELEMENTS = 2 ** 20         # float elements quantized at once (4 MiB in fp32)


@functools.partial(jax.jit, static_argnames=("fmt", "block"))
def _quantize_chunk(w, fmt, block):
    _, arrays = quantize(w, fmt, block=block, double_quant=False)
    return arrays


def quantize_streaming(spec: QSpec, read_columns, *, chunk_elements: int = STREAM_CHUNK_ELEMENTS):
    """``quantize(W, ...)``'s arrays (numpy, bit-identical) without ever holding W in float.

    ``read_columns(lead_index, cols)`` returns ``W[lead_index][:, cols]`` (``[in, len(cols)]``).
    int8 scales are per output column and nf4 blocks run along ``in`` inside one column, so a
    chunk of whole columns quantizes on its own; chunks hold at most ``chunk_elements`` floats.
    Only the codes and first-level scales of the whole tensor are kept (0.5-1 byte/param);
    double quant then runs on the complete scales, as :func:`quantize` does.
    """
    *lead, n_in, n_out = spec.shape
    step = max(1, min(n_out, chunk_elements // max(n_in, 1)))
    codes = scales = None
    cpu = jax.local_devices(backend="cpu")[0]
    for lead_index in np.ndindex(*lead):
        for o0 in range(0, n_out, step):
            cols = slice(o0, min(o0 + step, n_out))
            with jax.default_device(cpu):
                part = _quantize_chunk(jnp.asarray(read_columns(lead_index, cols)), spec.fmt,
                                       spec.block)
            c, s = np.asarray(part["codes"]), np.asarray(part["scales"])
            if codes is None:
                codes = np.empty((*lead, c.shape[0], n_out), c.dtype)
                scales = np.empty((*lead, s.shape[0], n_out), s.dtype)
            codes[lead_index + (slice(None), cols)] = c
            scales[lead_index + (slice(None), cols)] = s
            del part, c, s
    if not spec.double_quant:
        return {"codes": codes, "scales": scales}
    with jax.default_device(cpu):
        second = _quantize_scales(jnp.asarray(scales))
    return {"codes": codes, **{k: np.asarray(v) for k, v in second.items()}}


def storage_bytes(arrays) -> int:
    return int(sum(np.dtype(a.dtype).itemsize * math.prod(a.shape) for a in arrays.values()))


# ------------------------------------------------------------------------------ matmuls
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def quantized_matmul(spec: QSpec, x, arrays):
    """``x[..., in] @ W[in, out]`` with W dequantized inside; no gradient to ``arrays``."""
    return jnp.einsum("...i,io->...o", x, dequantize(spec, arrays, x.dtype))


def _qmm_fwd(spec, x, arrays):
    return quantized_matmul(spec, x, arrays), arrays


def _qmm_bwd(spec, arrays, g):
    w = dequantize(spec, arrays, g.dtype)
    return jnp.einsum("...o,io->...i", g, w), None


quantized_matmul.defvjp(_qmm_fwd, _qmm_bwd)


@jax.tree_util.register_pytree_node_class
class QuantizedGroups(GroupWeights):
    """Stacked quantized weights ``[E, in, out]`` as a ``grouped_matmul`` weight source: the
    grouped matmul's loop dequantizes ONE expert (codes and, with double quant, its slice of the
    scale codes) when it reaches that expert's rows, forward and backward. So a QLoRA MoE layer
    never holds more than one expert's float weight, and no dequantized weight depends on the
    frozen codes alone (XLA could otherwise hoist it out of the micro-batch loop and keep every
    layer's copy alive)."""

    def __init__(self, spec: QSpec, arrays: dict):
        self.spec, self.arrays = spec, arrays

    @property
    def shape(self):
        """The experts held (all of them, or one device's shard under expert parallelism)."""
        return (self.arrays["codes"].shape[0], *self.spec.shape[-2:])

    def tree_flatten(self):
        names = tuple(sorted(self.arrays))
        return tuple(self.arrays[n] for n in names), (self.spec, names)

    @classmethod
    def tree_unflatten(cls, aux, children):
        spec, names = aux
        return cls(spec, dict(zip(names, children)))

    def group(self, g, dtype):
        return dequantize(self.spec, _expert_arrays(self.spec, self.arrays, g), dtype, expert=True)


def _expert_arrays(spec: QSpec, arrays, g) -> dict:
    """Expert ``g``'s storage: its codes and first-level scales. Double-quant scale codes are
    grouped per expert (``[E, groups, group]``, :func:`_dq_group`: index them) or, when one
    expert's scale count has no usable divisor, flat across experts (slice them out, each
    element with its own group's fp32 scale; only with every expert held, as in
    :func:`_nf4_scales`)."""
    take = functools.partial(jax.lax.dynamic_index_in_dim, index=g, keepdims=False)
    out = {"codes": take(arrays["codes"])}
    if spec.fmt == "int8" or not spec.double_quant:
        out["scales"] = take(arrays["scales"])
        return out
    _, n_in, n_out = spec.shape
    n = (n_in // spec.block) * n_out                                   # scales per expert
    if arrays["scale_codes"].ndim == len(spec.shape):                  # grouped per expert
        values = take(arrays["scale_codes"]).astype(jnp.float32) * take(arrays["scale_scales"])
    elif arrays["codes"].shape[0] == spec.shape[0]:                    # grouped flat
        flat = arrays["scale_codes"].reshape(-1)
        codes = jax.lax.dynamic_slice_in_dim(flat, g * n, n).astype(jnp.float32)
        values = codes * arrays["scale_scales"].reshape(-1)[(g * n + jnp.arange(n))
                                                            // DOUBLE_QUANT_GROUP]
    else:
        raise NotImplementedError(
            f"double-quant scales of a {spec.shape} weight are grouped across experts; a shard of "
            f"its experts cannot read them: set lora.double_quant=false")
    out["scales"] = (values.reshape(-1) + arrays["scale_offset"]).reshape(n_in // spec.block, n_out)
    return out


# ------------------------------------------------------------------------------ modules
def _axes_for(name: str, kernel_axes, ndim: int, stacked: bool):
    """Logical axes of a storage array: codes keep the weight's; scales keep all but ``in``;
    double-quant groups keep the leading (stacked layers, expert) dims when grouped per leading
    index; the other double-quant pieces only the stacked ``layers`` axis (when there is one)."""
    if kernel_axes is None:
        return None
    if name == "codes":
        return tuple(kernel_axes)
    if name == "scales":
        return tuple(kernel_axes[:-2]) + (None, kernel_axes[-1])
    if name in ("scale_codes", "scale_scales") and ndim == len(kernel_axes):
        return tuple(kernel_axes[:-2]) + (None, None)
    return (LAYERS_AXIS,) + (None,) * (ndim - 1) if stacked else None  # flat double-quant pieces


class QuantizedTensor(nnx.Module):
    """One quantized weight: static ``spec`` + ``QuantizedArray`` storage.

    A stacked weight ``[L, ...]`` (scanned layers) is quantized layer by layer: ``spec``
    describes ONE layer (the same blocks as in the loop layout, double quant included) and every
    storage array gets a leading ``L`` axis, so the scan body sees a per-layer tensor."""

    def __init__(self, weight: nnx.Variable, fmt: str, *, block: int, double_quant: bool, dtype):
        w = weight[...]
        self.layers = w.shape[0] if num_stacked(weight) else 0
        kw = dict(block=block, double_quant=double_quant, dtype=dtype)
        if self.layers:
            specs = []

            def one(w_layer):
                spec, arrays = quantize(w_layer, fmt, **kw)
                specs.append(spec)
                return arrays
            arrays = jax.vmap(one)(w)
            self.spec = specs[0]
        else:
            self.spec, arrays = quantize(w, fmt, **kw)
        axes = weight.get_metadata().get("logical_axes")
        self.names = tuple(sorted(arrays))
        for name, value in arrays.items():
            setattr(self, name, QuantizedArray(value, logical_axes=_axes_for(
                name, axes, value.ndim, bool(self.layers))))
        self.logical_axes = axes

    @property
    def n_params(self) -> int:
        return self.spec.n_params * max(self.layers, 1)

    def arrays(self) -> dict:
        return {name: getattr(self, name)[...] for name in self.names}

    def dequantize(self, dtype=None):
        if self.layers:
            return jax.vmap(lambda a: dequantize(self.spec, a, dtype))(self.arrays())
        return dequantize(self.spec, self.arrays(), dtype)


class QuantizedLinear(nnx.Module):
    """``y = x @ dequantize(W)`` standing in for ``medjax.models.Linear``."""

    def __init__(self, base, fmt: str, *, block: int = 64, double_quant: bool = False):
        self.in_features, self.out_features = base.kernel[...].shape[-2:]
        self.dtype = getattr(base, "dtype", jnp.float32)
        self.weight = QuantizedTensor(base.kernel, fmt, block=block, double_quant=double_quant,
                                      dtype=self.dtype)

    def __call__(self, x):
        return quantized_matmul(self.weight.spec, x.astype(self.dtype), self.weight.arrays())

    def to_float(self, param_dtype=jnp.float32):
        from medjax.models.layers import Linear
        lin = nnx.eval_shape(lambda: Linear(self.in_features, self.out_features,
                                            logical_axes=self.weight.logical_axes,
                                            rngs=nnx.Rngs(0), dtype=self.dtype,
                                            param_dtype=param_dtype))
        lin.kernel = nnx.Param(self.weight.dequantize(param_dtype),
                               logical_axes=self.weight.logical_axes)
        return lin


class QuantizedExperts(nnx.Module):
    """Quantized stand-in for ``medjax.models.Experts`` (grouped matmuls via ``grouped_matmul``)."""

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, base, fmt: str, *, block: int = 64, double_quant: bool = False):
        self.dtype = getattr(base, "dtype", jnp.float32)
        for name in self.PROJECTIONS:
            setattr(self, name, QuantizedTensor(getattr(base, name), fmt, block=block,
                                                double_quant=double_quant, dtype=self.dtype))

    def project(self, name, x_NI, group_sizes_E):
        q = getattr(self, name)
        return grouped_matmul(x_NI.astype(self.dtype), QuantizedGroups(q.spec, q.arrays()),
                              group_sizes_E)

    def __call__(self, x_NH, group_sizes_E):
        h = jax.nn.silu(self.project("gate_proj", x_NH, group_sizes_E)) * \
            self.project("up_proj", x_NH, group_sizes_E)
        return self.project("down_proj", h, group_sizes_E)

    def to_float(self, param_dtype=jnp.float32):
        """A plain ``Experts`` module holding the dequantized weights."""
        from types import SimpleNamespace

        from medjax.models.moe import Experts
        E, H, I = self.gate_proj.spec.shape
        shape_cfg = SimpleNamespace(num_experts=E, hidden_size=H, intermediate_size=I)
        plain = nnx.eval_shape(lambda: Experts(shape_cfg, rngs=nnx.Rngs(0), dtype=self.dtype,
                                               param_dtype=param_dtype))
        for name in self.PROJECTIONS:
            q = getattr(self, name)
            setattr(plain, name, nnx.Param(q.dequantize(param_dtype), logical_axes=q.logical_axes))
        return plain


# ------------------------------------------------------------------------------ model surgery
def _set(model, path, new):
    parent = model
    for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def _is_plain_linear(m) -> bool:
    kernel = getattr(m, "kernel", None)
    return isinstance(kernel, nnx.Variable) and kernel[...].ndim == 2 + num_stacked(kernel)


def _is_plain_experts(m) -> bool:
    return callable(getattr(m, "project", None)) and all(
        isinstance(getattr(m, n, None), nnx.Variable) for n in QuantizedExperts.PROJECTIONS)


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
        if _is_plain_linear(target):
            new = QuantizedLinear(target, fmt, block=block, double_quant=double_quant)
            report.add(".".join(map(str, where)), [new.weight])
        elif _is_plain_experts(target):
            new = QuantizedExperts(target, fmt, block=block, double_quant=double_quant)
            report.add(".".join(map(str, where)),
                       [getattr(new, n) for n in QuantizedExperts.PROJECTIONS])
        else:
            continue
        _set(model, where, new)
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
            report.add(".".join(map(str, path)), [module])
    report.total_params = _total_params(model)
    report.total_bytes = _total_bytes(model)
    return report


def dequantize_model(model, param_dtype=jnp.float32):
    """Replace every quantized module by a plain one holding its dequantized weights, in place."""
    for path, module in reversed(list(nnx.iter_modules(model))):
        if isinstance(module, (QuantizedLinear, QuantizedExperts)):
            _set(model, tuple(path), module.to_float(param_dtype))
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
