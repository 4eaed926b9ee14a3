"""Quantized weights as modules: the dequantize-inside matmuls (``quantized_matmul``, and
``QuantizedGroups`` for ``grouped_matmul``), and the stand-ins ``QuantizedLinear`` /
``QuantizedExperts`` for the model's ``Linear`` / ``Experts``."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from medjax.models.moe import EXPERT_PROJECTIONS
from medjax.models.stack import LAYERS_AXIS, num_stacked
from medjax.ops.grouped_matmul import GroupWeights, grouped_matmul
from medjax.quant.codec import DOUBLE_QUANT_GROUP, QSpec, _nf4_scales, dequantize, quantize


class QuantizedArray(nnx.Variable):
    """Frozen quantized storage (codes / scales); never an ``nnx.Param``, so never trained."""


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

    def dequantize(self, dtype=None, adapter=None):
        """The whole float weight (export / eval), jitted: XLA fuses unpacking, level lookup and
        scaling into one pass that writes ``dtype``; run eagerly, each step materialised int32
        indices and f32 values of the whole stack (measured: a 2-layer Mixtral-width export
        OOM-killed at 14.5 GiB).

        ``adapter`` (a LoRA ``_Adapter`` stacked like this weight): the merged weight
        ``w + scale * A @ B`` instead, ``w`` rounded to the compute dtype first (the weight the
        quantized forward multiplied by) and the sum taken in fp32, one ``[in, out]`` matrix at a
        time: neither the dequantized stack nor a stack-sized fp32 product ever exists."""
        dtype = jnp.dtype(dtype or self.spec.dtype)
        if adapter is None:
            one = functools.partial(dequantize, self.spec, dtype=dtype)
            return jax.jit(jax.vmap(one) if self.layers else one)(self.arrays())
        from medjax.lora import fold_matrices
        arrays = self.arrays()
        if self.spec.fmt == "nf4" and self.spec.double_quant:
            arrays = {"codes": arrays["codes"],
                      "scales": _plain_scales(self.spec, bool(self.layers))(arrays)}
        return fold_matrices(arrays, adapter.lora_a[...], adapter.lora_b[...], adapter.scale,
                             dtype=dtype, matrix=_one_matrix(self.spec))


@functools.cache
def _plain_scales(spec: QSpec, stacked: bool):
    """Double-quantized nf4 storage → its plain first-level scales (small): with the codes, the
    form in which one ``[in, out]`` matrix's slice dequantizes on its own
    (``dequantize(expert=True)``)."""
    plain = functools.partial(_nf4_scales, spec)
    return jax.jit(jax.vmap(plain) if stacked else plain)


@functools.cache
def _one_matrix(spec: QSpec):
    """One ``[in, out]`` matrix of ``spec``'s weight from its slice of the (plain-scaled) storage,
    in the compute dtype: the weight the quantized forward multiplied by. Cached per spec, so
    ``lora.fold_matrices`` compiles once per weight shape."""
    return functools.partial(dequantize, spec, dtype=spec.dtype, expert=True)


class QuantizedLinear(nnx.Module):
    """``y = x @ dequantize(W)`` standing in for ``medjax.models.Linear``."""

    def __init__(self, base, fmt: str, *, block: int = 64, double_quant: bool = False):
        self.in_features, self.out_features = base.kernel[...].shape[-2:]
        self.dtype = getattr(base, "dtype", jnp.float32)
        self.weight = QuantizedTensor(base.kernel, fmt, block=block, double_quant=double_quant,
                                      dtype=self.dtype)

    def __call__(self, x):
        return quantized_matmul(self.weight.spec, x.astype(self.dtype), self.weight.arrays())

    def to_float(self, param_dtype=None, adapters=None):
        """A plain ``Linear`` holding the dequantized weight, in ``param_dtype`` (default: the
        compute dtype, i.e. exactly the weight the quantized forward multiplied by); with
        ``adapters`` (``{"kernel": _Adapter}``) the LoRA-merged weight."""
        from medjax.models.layers import Linear
        param_dtype = param_dtype or self.dtype
        lin = nnx.eval_shape(lambda: Linear(self.in_features, self.out_features,
                                            logical_axes=self.weight.logical_axes,
                                            rngs=nnx.Rngs(0), dtype=self.dtype,
                                            param_dtype=param_dtype))
        lin.kernel = nnx.Param(self.weight.dequantize(param_dtype, (adapters or {}).get("kernel")),
                               logical_axes=self.weight.logical_axes)
        return lin


class QuantizedExperts(nnx.Module):
    """Quantized stand-in for ``medjax.models.Experts`` (grouped matmuls via ``grouped_matmul``)."""

    def __init__(self, base, fmt: str, *, block: int = 64, double_quant: bool = False):
        self.dtype = getattr(base, "dtype", jnp.float32)
        for name in EXPERT_PROJECTIONS:
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

    def to_float(self, param_dtype=None, adapters=None):
        """A plain ``Experts`` module holding the dequantized weights (``param_dtype`` and
        ``adapters``, by projection name, as for ``QuantizedLinear.to_float``)."""
        from types import SimpleNamespace
        param_dtype = param_dtype or self.dtype

        from medjax.models.moe import Experts
        E, H, I = self.gate_proj.spec.shape
        shape_cfg = SimpleNamespace(num_experts=E, hidden_size=H, intermediate_size=I)
        plain = nnx.eval_shape(lambda: Experts(shape_cfg, rngs=nnx.Rngs(0), dtype=self.dtype,
                                               param_dtype=param_dtype))
        for name in EXPERT_PROJECTIONS:
            q = getattr(self, name)
            merged = q.dequantize(param_dtype, (adapters or {}).get(name))
            setattr(plain, name, nnx.Param(merged, logical_axes=q.logical_axes))
        return plain
