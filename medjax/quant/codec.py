"""The int8 / nf4 codecs: quantize a float weight ``[..., in, out]`` to codes + scales and back
(``quantize`` / ``dequantize``), also streamed column-chunk by column-chunk from a checkpoint
(``quantize_streaming``). The formats are described in :mod:`medjax.quant`."""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

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
