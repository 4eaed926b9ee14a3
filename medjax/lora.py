"""LoRA by module surgery: wrap a model's projections from the outside, train only the adapters.

A low-rank adapter adds ``(alpha / rank) * dropout(x) @ A @ B`` to a frozen projection
``y = base(x)``, with ``A [in, r]`` initialised uniform(±1/sqrt(in)) (PEFT's kaiming default) and
``B [r, out]`` zero, so a freshly wrapped model computes exactly what the base did.

``apply_lora(model, cfg)`` walks the module tree and replaces, in place,

* every ``Linear`` (a module with a 2-D ``kernel [in, out]``) whose path matches a target pattern
  by ``LoRALinear(base)`` — attention q/k/v/o, MLP gate/up/down, the Mixtral router
  ``block_sparse_moe.gate``;
* every ``Experts`` module (stacked ``[E, in, out]`` weights used through ``project(name, x,
  group_sizes)`` and ``medjax.ops.grouped_matmul``) whose projection names match, by
  ``LoRAExperts(base)`` holding one ``[E, in, r]`` / ``[E, r, out]`` adapter pair per projection,
  i.e. a separate adapter for every expert, applied with the same grouped matmul.

Wrappers never re-implement the base computation: ``LoRALinear`` calls ``base(x)`` and
``LoRAExperts.project`` calls ``base.project(...)``, so a quantized base module (QLoRA, which
dequantizes inside its own ``__call__`` / ``project``) is wrapped by the same code.
Adapter weights are ``nnx.LoRAParam`` (fp32, the trainable master copy); the optimizer is
built on ``nnx.LoRAParam`` only, so base weights never enter the optimizer state and stay
bit-identical. ``merge_lora`` folds the adapters into the base weights; ``unmerge_lora``
takes them out again; ``merged_model`` returns a plain, wrapper-free copy for export.
"""
from __future__ import annotations

import fnmatch
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from medjax.errors import ConfigError
from medjax.models.moe import EXPERT_PROJECTIONS
from medjax.ops.grouped_matmul import grouped_matmul
from medjax.ops.target import compiler_options
from medjax.surgery import is_experts, is_linear, module_at, path_str, replace_module

# ------------------------------------------------------------------------------ matching
def matches(path: str, patterns) -> bool:
    """``pattern`` without a dot matches the last path component; with a dot, a path suffix."""
    last = path.rsplit(".", 1)[-1]
    for pattern in patterns:
        if "." in pattern:
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, "*." + pattern):
                return True
        elif fnmatch.fnmatch(last, pattern):
            return True
    return False


# ------------------------------------------------------------------------------ low-rank product
@jax.custom_vjp
def low_rank(x, a, b):
    """``x @ A @ B`` for ``x [..., in]``, ``A [in, r]``, ``B [r, out]``.

    The backward is written by hand so that the token-long operands (``x`` and the output
    gradient) are only ever used in the layout a matmul reads directly; autodiff's ``xᵀ @ g``
    for ``dA`` materialised a transposed copy of ``x`` per projection (about 15% of a LoRA
    step on CPU). Transposes touch only the small ``[N, r]`` / ``[r, in]`` arrays.
    """
    return (x @ a) @ b


def _low_rank_fwd(x, a, b):
    h = x @ a
    return h @ b, (x, a, b, h)


def _low_rank_bwd(res, g):
    x, a, b, h = res
    x_NI, g_NO, h_NR = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), h.reshape(-1, a.shape[1])
    gh_NR = g_NO @ b.T                  # d(x @ A)
    db_RO = h_NR.T @ g_NO               # [r, N] @ [N, out]
    da_IR = (gh_NR.T @ x_NI).T          # (dAᵀ = ghᵀ @ x): x stays the right-hand [N, in] operand
    dx = (gh_NR @ a.T).reshape(x.shape)
    return dx, da_IR.astype(a.dtype), db_RO.astype(b.dtype)


low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


# ------------------------------------------------------------------------------ wrappers
def _logical(var, index):
    axes = getattr(var, "logical_axes", None)
    return None if axes is None else axes[index]


class _Adapter(nnx.Module):
    """``A [..., in, r]``, ``B [..., r, out]`` (leading dims: stacked layers, experts), dropout on
    the input. Under the layer scan each layer sees its own slice ``A[i]``, ``B[i]``."""

    def __init__(self, base_weight: nnx.Variable, *, rank, alpha, dropout, rngs):
        *lead, d_in, d_out = base_weight[...].shape
        bound = 1.0 / math.sqrt(d_in)
        lead_axes = tuple(_logical(base_weight, i) for i in range(len(lead)))
        self.lora_a = nnx.LoRAParam(
            jax.random.uniform(rngs.params(), (*lead, d_in, rank), jnp.float32, -bound, bound),
            logical_axes=lead_axes + (_logical(base_weight, -2), None))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, d_out), jnp.float32),
                                    logical_axes=lead_axes + (None, _logical(base_weight, -1)))
        self.rank, self.scale = rank, alpha / rank
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def delta_weight(self):
        """``scale * A @ B`` in fp32, shaped like the base weight."""
        return self.scale * jnp.einsum("...ir,...ro->...io", self.lora_a[...], self.lora_b[...])

    def _input(self, x):
        return self.dropout(x) if self.dropout is not None else x


class LoRALinear(nnx.Module):
    """``base(x) + scale * dropout(x) @ A @ B`` around any module with ``kernel [in, out]``."""

    def __init__(self, base, *, rank, alpha, dropout=0.0, rngs):
        self.base = base
        self.adapter = _Adapter(base.kernel, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs)
        self.merged = False

    def __call__(self, x):
        y = self.base(x)
        if self.merged:
            return y
        dtype = getattr(self.base, "dtype", x.dtype)
        a, b = self.adapter.lora_a[...].astype(dtype), self.adapter.lora_b[...].astype(dtype)
        delta = low_rank(self.adapter._input(x).astype(dtype), a, b) * self.adapter.scale
        return y + delta.astype(y.dtype)


class LoRAExperts(nnx.Module):
    """Per-expert adapters for an ``Experts`` module; the base SwiGLU runs with our ``project``."""

    def __init__(self, base, *, projections, rank, alpha, dropout=0.0, rngs):
        self.base = base
        self.projections = tuple(projections)
        for name in self.projections:
            setattr(self, name, _Adapter(getattr(base, name), rank=rank, alpha=alpha,
                                         dropout=dropout, rngs=rngs))
        self.merged = False

    def project(self, name, x_NI, group_sizes_E):
        y = self.base.project(name, x_NI, group_sizes_E)
        if self.merged or name not in self.projections:
            return y
        adapter = getattr(self, name)
        dtype = getattr(self.base, "dtype", x_NI.dtype)
        a, b = adapter.lora_a[...].astype(dtype), adapter.lora_b[...].astype(dtype)
        h_NR = grouped_matmul(adapter._input(x_NI).astype(dtype), a, group_sizes_E)
        delta = grouped_matmul(h_NR, b, group_sizes_E) * adapter.scale
        return y + delta.astype(y.dtype)

    def __call__(self, x_NH, group_sizes_E):
        # The base class's forward, dispatching its projections through this wrapper's project().
        return type(self.base).__call__(self, x_NH, group_sizes_E)


# ------------------------------------------------------------------------------ surgery
def apply_lora(model, cfg, *, seed: int = 0):
    """Wrap every matching projection of ``model`` in place; returns ``(model, wrapped_paths)``.

    ``cfg`` has ``rank``, ``alpha``, ``dropout`` and ``targets`` (the run config's ``lora``
    section; this module does not import the run config, which sits above it)."""
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    found = [(tuple(p), m) for p, m in nnx.iter_modules(model)]
    wrapped = []
    for path, module in found:
        name = path_str(path)
        if isinstance(module, (LoRALinear, LoRAExperts)) or any(
                isinstance(module_at(model, path[:i]), (LoRALinear, LoRAExperts))
                for i in range(1, len(path))):
            continue
        kw = dict(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, rngs=rngs)
        if is_experts(module):
            projections = [p for p in EXPERT_PROJECTIONS
                           if matches(f"{name}.{p}", cfg.targets) or matches(name, cfg.targets)]
            if projections:
                replace_module(model, path, LoRAExperts(module, projections=projections, **kw))
                wrapped.append(name)
        elif is_linear(module) and matches(name, cfg.targets):
            replace_module(model, path, LoRALinear(module, **kw))
            wrapped.append(name)
    if not wrapped:
        raise ConfigError(f"lora.targets {list(cfg.targets)} matched no Linear/Experts module")
    return model, wrapped


def lora_modules(model):
    """``[(dotted_path, wrapper)]`` for every LoRA wrapper in ``model``."""
    return [(path_str(p), m) for p, m in nnx.iter_modules(model)
            if isinstance(m, (LoRALinear, LoRAExperts))]


def weight_adapters(wrapper):
    """``[(base_weight_name, _Adapter)]`` of a LoRA wrapper."""
    if isinstance(wrapper, LoRALinear):
        return [("kernel", wrapper.adapter)]
    return [(name, getattr(wrapper, name)) for name in wrapper.projections]


def _folded(w, a, b, scale):
    """``w + scale * a @ b`` (fp32 sum, ``w``'s dtype kept): :func:`fold_matrices`."""
    return fold_matrices(w, a, b, scale, dtype=w.dtype)


def _as_stored(w):
    return w


def fold_matrices(weights, a, b, scale, *, dtype, matrix=_as_stored):
    """``matrix(weights) + scale * a @ b``, summed in fp32 and written in ``dtype``, one
    ``[in, out]`` matrix at a time over the leading (layer / expert) dims of ``a`` and ``b``:
    at 7B a whole stack's fp32 temporaries would be 11 GiB. ``weights`` is the weight, or any
    pytree with the same leading dims from which ``matrix`` (hashable: the compiled program is
    cached on it) makes one matrix, e.g. QLoRA's codes and scales dequantized.
    Compiled with ``ops.target.compiler_options``: XLA:CPU otherwise hoists the fp32 convert of the
    whole stack out of the loop (the 7B merged export peaked at 22 GiB)."""
    options = compiler_options(a)
    return _fold_program(matrix, jnp.dtype(dtype), tuple(sorted((options or {}).items())))(
        weights, a, b, scale)


@functools.cache
def _fold_program(matrix, dtype, options: tuple):
    def folded(weights, a, b, scale):
        def one(wab):
            w, a, b = wab
            return (matrix(w).astype(jnp.float32) + scale * jnp.dot(a, b)).astype(dtype)
        lead = a.shape[:-2]
        if not lead:
            return one((weights, a, b))
        matrices = lambda x: x.reshape(-1, *x.shape[len(lead):])  # noqa: E731
        out = jax.lax.map(one, (jax.tree.map(matrices, weights), matrices(a), matrices(b)))
        return out.reshape(*lead, *out.shape[1:])
    return jax.jit(folded, static_argnames="scale", compiler_options=dict(options) or None)


def _fold(model, sign: float, merged_flag: bool):
    for _, wrapper in lora_modules(model):
        if wrapper.merged == merged_flag:
            continue
        for weight_name, adapter in weight_adapters(wrapper):
            var = getattr(wrapper.base, weight_name)
            var[...] = _folded(var[...], adapter.lora_a[...], adapter.lora_b[...],
                               sign * adapter.scale)
        wrapper.merged = merged_flag
    return model


def merge_lora(model):
    """Fold ``scale * A @ B`` into the base weights in place (wrappers then skip the adapter)."""
    return _fold(model, +1.0, True)


def unmerge_lora(model):
    """Undo ``merge_lora`` in place (exact up to the base weight dtype's rounding)."""
    return _fold(model, -1.0, False)


def strip_lora(model):
    """Replace every wrapper by its base module in place (adapters dropped; merge first)."""
    for path, _ in reversed([(tuple(p), m) for p, m in nnx.iter_modules(model)
                             if isinstance(m, (LoRALinear, LoRAExperts))]):
        replace_module(model, path, module_at(model, path).base)
    return model


def merged_model(model):
    """A wrapper-free copy of ``model`` with adapters merged (fp32 merge, base dtype kept)."""
    copy = nnx.clone(model)
    return strip_lora(merge_lora(copy))


def set_dropout(model, training: bool):
    """A view of ``model`` with LoRA dropout on (training) or off (eval)."""
    return nnx.view(model, deterministic=not training, raise_if_not_found=False)


def count_params(model, filt=nnx.Param) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, filt)))
