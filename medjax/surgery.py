"""Module surgery: find the model's projections and swap modules in place, from the outside.

LoRA (``medjax.lora``) and QLoRA (``medjax.quant``) never edit the model code: they walk the
module tree, recognise a projection by its weights (a ``Linear``'s ``kernel [in, out]``, an
``Experts``' stacked ``gate/up/down_proj``, either with a leading stacked-layers axis) and
replace it by a wrapper or a quantized stand-in at its path.
"""
from __future__ import annotations

from flax import nnx

from medjax.models.moe import EXPERT_PROJECTIONS
from medjax.models.stack import num_stacked


def path_str(path) -> str:
    """A module path as the dotted name reports and ``lora.targets`` patterns use."""
    return ".".join(str(p) for p in path)


def is_linear(module) -> bool:
    """A module with ``kernel [in, out]`` (``[L, in, out]`` in stacked layers)."""
    kernel = getattr(module, "kernel", None)
    return isinstance(kernel, nnx.Variable) and kernel[...].ndim == 2 + num_stacked(kernel)


def is_experts(module) -> bool:
    """A module used like ``models.moe.Experts``: ``project(name, x, groups)`` over its
    stacked gate/up/down projections."""
    return callable(getattr(module, "project", None)) and all(
        isinstance(getattr(module, n, None), nnx.Variable) for n in EXPERT_PROJECTIONS)


def module_at(model, path):
    """The module at ``path`` (attribute names and list indices)."""
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def replace_module(model, path, new) -> None:
    """Put ``new`` at ``path`` in place of what is there."""
    parent, key = module_at(model, path[:-1]), path[-1]
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)
