"""Stacked decoder layers (``model.scan_layers``): one layer module whose every weight has a
leading ``layers`` axis ``[L, ...]``, run by ``jax.lax.scan`` so the program (and its compile
time) holds ONE layer body whatever the depth.

The scan body is pure in the layer's state, as ``decoder.remat_layer`` is: the stacked state
(weights, frozen LoRA bases, ``QuantizedArray`` codes, adapters: everything but RNG streams)
is scanned over as ``xs``; the RNG streams (LoRA dropout) ride in the carry, so each layer
advances them as the loop does, and are written back afterwards. Per-layer outputs (KV cache
slices, router statistics) come back as ``ys``.

Per-layer paths ``("model", "layers", i, ...)`` stay the one naming of layer weights outside
the model (HF/GGUF names, PEFT files): :func:`split_layer_path` maps one to its stacked
variable ``("model", "layers", ...)`` and index ``i``, and :func:`per_layer_flat` views either
layout's flat state by per-layer paths.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS_AXIS = "layers"            # logical axis of the stacked dim; sharding never splits it


def stack_modules(modules):
    """``modules[0]`` with every non-RNG variable replaced by the stack of all ``modules``'
    values (leading axis ``L``) and ``"layers"`` prepended to its ``logical_axes``."""
    first = modules[0]
    states = [nnx.state(m, nnx.Not(nnx.RngState)) for m in modules]
    nnx.update(first, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    for _, var in nnx.iter_graph(first):
        if isinstance(var, nnx.Variable) and not isinstance(var, nnx.RngState):
            axes = var.get_metadata().get("logical_axes")
            if axes is not None:
                var.set_metadata("logical_axes", (LAYERS_AXIS,) + tuple(axes))
    return first


def num_stacked(var) -> int:
    """1 when ``var`` carries the stacked ``layers`` axis first, else 0."""
    axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
    return int(bool(axes) and axes[0] == LAYERS_AXIS)


def scan_layers(layers, h_BTH, positions_BT, inv_freq, segment_ids, kv, *, remat=False,
                policy=None, dtype=None):
    """Run the stacked ``layers`` over ``h_BTH``: ``(h_BTH, kv, router_stats summed)``.

    ``kv`` is ``(k, v)`` ``[L, B, S, Hkv, D]`` or ``None``; with ``remat`` the body runs under
    ``jax.checkpoint(policy=policy)`` (one layer's activations recomputed in the backward).
    ``dtype``: the layers' compute dtype; the scan runs on their weights cast to it
    (:func:`compute_weights`).
    """
    graphdef, rng_state, weights = compute_weights(layers, dtype)
    advanced = []        # set while tracing: did the layer draw from its RNG streams?
    body = layer_step(graphdef, positions_BT, inv_freq, segment_ids, advanced, remat=remat,
                      policy=policy)
    (h_BTH, rng_state), (kv, stats) = jax.lax.scan(body, (h_BTH, rng_state), (weights, kv))
    # Written back only when drawn from (LoRA dropout in training), as the loop's layers mutate
    # their RNG counters only then: an inference call inside another transform (the scorer's
    # lax.map over choices) must not write to variables created outside it.
    if any(advanced):
        nnx.update(layers, rng_state)
    return h_BTH, kv, jnp.sum(stats, axis=0)


def compute_weights(layers, dtype):
    """``(graphdef, rng_state, weights)`` of the stacked ``layers``, every floating ``nnx.Param``
    wider than ``dtype`` cast to it (``None``: none; the pipeline's stages run on the masters,
    their gradient carry being the micro-batches' accumulator: models/pipeline.py). The layers
    cast each weight to their compute dtype before using it anyway (``Linear``, ``RMSNorm``,
    ``Experts``, LoRA adapters), so the values are the same. Cast here, outside the scan, the
    weights' gradient comes back from the scan's backward as a stacked ``[L, ...]`` buffer in
    ``dtype`` (bf16: half of fp32) and becomes fp32 in the optimizer's update; cast inside, that
    buffer is fp32, and XLA hoists the cast out of the loop all the same (a stacked bf16 copy of
    the weights beside it). Llama-2-7B, v5p-8, FSDP, full fine-tuning: 3 GiB less per chip
    (docs/PERFORMANCE.md)."""
    graphdef, rng_state, params, rest = nnx.split(layers, nnx.RngState, nnx.Param, ...)
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        params = jax.tree.map(
            lambda x: x.astype(dtype) if (jnp.issubdtype(x.dtype, jnp.floating)
                                          and x.dtype.itemsize > dtype.itemsize) else x, params)
    return graphdef, rng_state, nnx.merge_state(params, rest)


def layer_step(graphdef, positions_BT, inv_freq, segment_ids, advanced: list, *, remat=False,
               policy=None):
    """The scan body running one layer of a stack (here and in each pipeline stage,
    models/pipeline.py): ``((h, rng), (w, kv)) -> ((h, rng), (kv, router_stats))``, the layer
    merged from its slice ``w`` of the weights and the carried RNG streams ``rng``. While
    tracing it appends to ``advanced`` whether the layer drew from those streams. With ``remat``
    it runs under ``jax.checkpoint(policy=policy)``."""
    def body(carry, xs):
        h, rng = carry
        w, kv_i = xs
        drawn = _values(rng)       # before the call: merge may share variables with ``rng``
        layer = unstacked_metadata(nnx.merge(graphdef, rng, w))
        h, kv_i, stats = layer(h, positions_BT, inv_freq, segment_ids, kv_i)
        new_rng = nnx.state(layer, nnx.RngState)
        advanced.append(any(a is not b for a, b in zip(drawn, _values(new_rng))))
        return (h, new_rng), (kv_i, stats)
    return jax.checkpoint(body, policy=policy, prevent_cse=False) if remat else body


def _values(state) -> list:
    return [v.get_value() if isinstance(v, nnx.Variable) else v
            for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))]


def unstacked_metadata(layer):
    """``layer`` (merged from one slice) with ``"layers"`` dropped from its variables'
    ``logical_axes``, so code inside a layer that reads them (sharding constraints, expert
    parallelism's specs) sees what a loop-layout layer has."""
    for _, var in nnx.iter_graph(layer):
        if isinstance(var, nnx.Variable) and num_stacked(var):
            var.set_metadata("logical_axes", tuple(var.get_metadata()["logical_axes"][1:]))
    return layer


# ------------------------------------------------------------------------------ per-layer names
def split_layer_path(path: tuple):
    """``("model", "layers", i, *rest)`` → ``(("model", "layers", *rest), i)``; other paths →
    ``(path, None)``."""
    path = tuple(path)
    for j in range(len(path) - 1):
        if path[j] == "layers" and isinstance(path[j + 1], int):
            return path[:j + 1] + path[j + 2:], path[j + 1]
    return path, None


def unstack_module(module, leave=nnx.Nothing) -> list:
    """The per-layer modules of a stacked module: module ``i`` holds slice ``[i]`` of every
    stacked variable (RNG streams shared). Variables matched by the nnx filter ``leave`` are not
    sliced (every module shares them whole): e.g. a LoRA wrapper's frozen ``base`` when only its
    adapters are read, which would otherwise be copied layer by layer (12 GiB at 7B)."""
    graphdef, rng, whole, rest = nnx.split(module, nnx.RngState, leave, ...)
    n = jax.tree.leaves(rest)[0].shape[0]
    return [nnx.merge(graphdef, rng, whole, jax.tree.map(lambda x, i=i: x[i], rest))
            for i in range(n)]


class LayerSlice:
    """Layer ``i`` of a stacked variable, sliced when read (``get_value()``), so a per-layer
    view of a model copies one layer at a time."""

    def __init__(self, var, i: int):
        self.var, self.i = var, i

    def get_value(self, index: tuple = ()):
        """Layer ``i`` (``index``: of it, e.g. one expert), sliced in one read."""
        return self.var.get_value()[(self.i, *index)]

    @property
    def shape(self) -> tuple:
        return tuple(self.var.get_value().shape[1:])


def read_value(var, index: tuple = ()):
    """``var``'s value (a variable or a ``LayerSlice``) at ``index``, sliced in one read."""
    return var.get_value(index) if isinstance(var, LayerSlice) else var.get_value()[index]


def value_shape(var) -> tuple:
    """A variable's shape, or a ``LayerSlice``'s, without reading (slicing) the value."""
    return var.shape if isinstance(var, LayerSlice) else tuple(var.get_value().shape)


def per_layer_flat(flat) -> dict:
    """``{per-layer path: variable | LayerSlice}`` from a model's flat state in either layout:
    stacked ``("model", "layers", *rest)`` becomes ``("model", "layers", i, *rest)``."""
    out = {}
    for path, var in dict(flat).items():
        path = tuple(path)
        if LAYERS_AXIS in path and not any(isinstance(x, int) for x in path) and num_stacked(var):
            j = path.index(LAYERS_AXIS) + 1
            for i in range(var.get_value().shape[0]):
                out[path[:j] + (i,) + path[j:]] = LayerSlice(var, i)
        else:
            out[path] = var
    return out
