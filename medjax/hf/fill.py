"""The format-independent fill engine: a prepared abstract Decoder, each checkpoint tensor placed
into it as it is read (``StreamingLoader``; the safetensors reader, ``hf/load.py``, and GGUF,
``hf/gguf.py``, both drive it).

The model is first built abstractly (``nnx.eval_shape``, no memory), optionally already wrapped
(LoRA) and quantized (QLoRA) by ``prepare``. With a sharding, each process computes the distinct
blocks its devices hold and reads each one once (``place_blocks``), copies it to the devices that
hold it and drops it: no device holds more than its shards plus the tensor in flight, and the
host at most one block beyond the devices. Quantized targets are quantized as they are read, in
bounded column chunks; the float weights of a QLoRA base never all exist.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medjax.errors import CheckpointError
from medjax.models import abstract_decoder
from medjax.models.stack import split_layer_path

ShardingFn = Callable[[tuple, tuple], "jax.sharding.Sharding | None"]


def whole_slices(index, shape) -> tuple:
    """``index`` as one ``slice(start, stop)`` per dim (what a sharding's device index means)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def place_blocks(shape: tuple, sharding, read: Callable[[tuple], np.ndarray]) -> jax.Array:
    """A global array from per-device blocks, each distinct block read ONCE per process.

    Devices of this process that hold the same block (replicas over data/tensor axes) share one
    read; blocks are read, copied to their devices and dropped one at a time, so the host holds
    at most one block beyond what the devices hold.
    """
    by_block: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop) for s in whole_slices(index, shape))
        by_block.setdefault(key, []).append(device)
    singles = {}
    for key, devices in by_block.items():
        block = read(tuple(slice(a, b) for a, b in key))
        for d in devices:
            singles[d] = jax.device_put(block, d)
        del block
    arrays = [singles[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def resolve_target(model, path: tuple):
    """The variable (or ``QuantizedTensor``) of a prepared model that HF param ``path`` fills:
    LoRA wrappers are looked through (``base``) and a quantized Linear's ``kernel`` is its
    ``weight``; ``None`` when the model has no such place."""
    from medjax.lora import LoRAExperts, LoRALinear
    from medjax.quant import QuantizedLinear
    node = model
    for i, part in enumerate(path):
        while isinstance(node, (LoRALinear, LoRAExperts)):
            node = node.base
        if isinstance(node, QuantizedLinear) and part == "kernel" and i == len(path) - 1:
            return node.weight
        if not _has(node, part):
            return None
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _has(node, part) -> bool:
    if isinstance(part, int):
        try:
            node[part]
        except (TypeError, IndexError, KeyError):
            return False
        return True
    return hasattr(node, part)


class StreamingLoader:
    """The prepared abstract model and how each checkpoint tensor lands in it (safetensors and
    GGUF share it): ``fill(path, read)`` with ``read(index, dtype) -> np.ndarray`` of
    ``param[index]``; a float target is placed block by block, a quantized one quantized in
    column chunks. The variables no checkpoint tensor fills are created first, by a jitted
    init with ``out_shardings``, while little else is resident.

    Paths are per layer (``("model", "layers", i, ...)``) in both layouts. With stacked layers
    a variable's ``[L, ...]`` buffer is created on the devices (sharded, zero) when its first
    layer arrives, and each layer is placed with the layer's sharding and written into index
    ``i`` by a donated in-place update: host and devices hold one layer in flight, as in the
    loop layout, and a sharded import still reads only each device's bytes."""

    def __init__(self, cfg, paths, *, dtype, param_dtype, attention_impl, prepare, sharding_of,
                 scan_layers=False):
        build = _builder(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                         prepare=prepare, scan_layers=scan_layers)
        self.model, self.sharding_of = nnx.eval_shape(build), sharding_of
        self.scan_layers = scan_layers
        keys = {self._key(p)[0] for p in paths}
        self.targets = {path: resolve_target(self.model, path) for path in keys}
        for path, target in self.targets.items():
            if target is None:
                raise CheckpointError(f"internal: no place for parameter {'.'.join(map(str, path))}")
        from_file = {id(v) for t in self.targets.values()
                     for v in ([t] if isinstance(t, nnx.Variable) else [getattr(t, n) for n in t.names])}
        _init_missing(self.model, build, sharding_of, lambda var: id(var) not in from_file)

    def _key(self, path):
        return split_layer_path(path) if self.scan_layers else (tuple(path), None)

    def shape(self, path) -> tuple:
        key, i = self._key(path)
        shape = _float_shape(self.targets[key])
        return shape if i is None else shape[1:]

    def fill(self, path, read) -> None:
        """Place HF param ``path`` (per-layer paths in both layouts) from ``read(index, dtype)``."""
        key, layer = self._key(path)
        target = self.targets[key]
        if isinstance(target, nnx.Variable):
            want = np.dtype(target.get_value().dtype)
            shape = _float_shape(target)[0 if layer is None else 1:]
            _set({key: target}, layer, {key: self.sharding_of(key, target)}, {key: shape},
                 {key: lambda idx: read(idx, want)})
        else:
            _fill_quantized(target, key, layer, read, self.sharding_of)
        _release_freed_memory()


def _release_freed_memory():
    """Hand the heap pages freed by the last tensor's buffers back to the OS (glibc keeps
    mid-size frees in its arenas), so host RSS follows what is live; a no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _builder(cfg, *, dtype, param_dtype, attention_impl, prepare, scan_layers=False):
    """``build()``, called only inside a trace (``eval_shape`` / ``jit``): the decoder with
    zero weights (free in a trace: no random init to trace), then ``prepare`` on top."""
    def build():
        model = abstract_decoder(cfg, dtype=dtype, param_dtype=param_dtype,
                                 attention_impl=attention_impl, scan_layers=scan_layers)
        for _, var in nnx.to_flat_state(nnx.state(model)):
            value = var.get_value()
            var.set_value(jnp.zeros(value.shape, value.dtype))
        if prepare is not None:
            prepare(model)                          # in place (its return value is ignored)
        return model
    return build


def sharding_fn(shardings, mesh, rules):
    """``(path, variable) -> Sharding | None`` from a mesh + rules, or the older per-param callable."""
    if mesh is not None:
        from medjax.sharding import rules_for, variable_sharding
        rules = rules or rules_for("fsdp")
        return lambda path, var: variable_sharding(var, mesh, rules, where=".".join(map(str, path)))
    if shardings is not None:
        return lambda path, var: shardings(path, tuple(var.get_value().shape))
    return lambda path, var: None


def _place(shape, sharding, read):
    if sharding is None:      # device_put, not jnp.asarray: on CPU it adopts the host buffer
        return jax.device_put(read(tuple(slice(None) for _ in shape)))
    return place_blocks(shape, sharding, read)


def _float_shape(target) -> tuple:
    if isinstance(target, nnx.Variable):
        return tuple(target.get_value().shape)
    layers = (target.layers,) if target.layers else ()     # QuantizedTensor
    return layers + tuple(target.spec.shape)


def _fill_quantized(qtensor, path, layer, read, sharding_of):
    """Quantize one weight (one layer of a stacked one) from bounded reads of its output columns;
    place its storage."""
    from medjax.quant import quantize_streaming
    lead = len(qtensor.spec.shape) - 2

    def read_columns(lead_index, cols):
        index = tuple(slice(i, i + 1) for i in lead_index) + (slice(None), cols)
        return read(index, np.float32)[(0,) * lead]

    arrays = quantize_streaming(qtensor.spec, read_columns)
    variables = {name: getattr(qtensor, name) for name in arrays}
    shardings = {name: sharding_of(tuple(path[:-1]) + (name,), var) for name, var in variables.items()}
    _set(variables, layer, shardings, {name: a.shape for name, a in arrays.items()},
         {name: (lambda idx, a=a: a[idx]) for name, a in arrays.items()})


def _set(variables: dict, layer, shardings: dict, shapes: dict, reads: dict):
    """Each ``variables[k]``'s value (``layer is None``) or its stacked slice ``[layer]`` from
    per-block ``reads[k]``; the stacked buffers of one weight are created and updated by one
    program each (fewer programs to compile)."""
    placed = {}
    for k in list(reads):
        sharding = shardings[k] if layer is None else _layer_sharding(shardings[k])
        placed[k] = _place(shapes[k], sharding, reads.pop(k))
    if layer is None:
        for k, value in placed.items():
            variables[k].set_value(value)
        return
    stacked = {k: var.get_value() for k, var in variables.items()}
    split = _stage_split_writer(shardings)
    if split is not None:                   # pipeline stages: each writes the layers it holds
        if not all(isinstance(v, jax.Array) for v in stacked.values()):
            stacked = jax.jit(lambda: {k: jnp.zeros(v.shape, v.dtype) for k, v in stacked.items()},
                              out_shardings=shardings)()
        written = split(stacked, placed, jnp.asarray(layer, jnp.int32))
    elif all(isinstance(v, jax.Array) for v in stacked.values()):
        written = _write_layer(stacked, placed, layer)
    else:                                   # abstract until the first layer: create and write
        structs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in stacked.items()}
        written = jax.jit(functools.partial(_new_stack, structs), out_shardings=shardings)(placed, layer)
    # the update runs asynchronously: without this wait the next layers are read while earlier
    # ones still wait to be written, and their buffers pile up (7B load peak 1.12-1.18x, varying)
    jax.block_until_ready(written)
    for k, value in written.items():
        variables[k].set_value(value)


def _with_layer(stacked, values, layer):
    """``stacked[k][layer] = values[k]`` for every ``k``."""
    return jax.tree.map(lambda s, v: jax.lax.dynamic_update_index_in_dim(s, v.astype(s.dtype), layer, 0),
                        stacked, values)


def _new_stack(structs, values, layer):
    """The stacked buffers (zeros) with their first-read layer written in."""
    return _with_layer({k: jnp.zeros(s.shape, s.dtype) for k, s in structs.items()}, values, layer)


# in place: the stacked buffers are donated
_write_layer = jax.jit(_with_layer, donate_argnums=0)


def _layer_sharding(sharding):
    """One layer's sharding from its stacked variable's: its other dims split alike, whole over
    the axis that splits the ``layers`` axis (``stage`` with pipeline stages), so the stage that
    holds the layer finds it on its devices."""
    if sharding is None:
        return None
    spec = tuple(sharding.spec)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))


def _stage_split_writer(shardings: dict):
    """For stacked buffers whose ``layers`` axis is split over a mesh axis (pipeline stages,
    ``sharding.rules_of``): ``write(stacked, values, layer)``, each device writing the layer into
    its own block when it holds it (``shard_map``; GSPMD would gather the whole stack to update
    one layer of a split axis). None when no buffer's ``layers`` axis is split."""
    specs = {k: tuple(sh.spec) for k, sh in shardings.items() if sh is not None}
    if not any(spec and spec[0] is not None for spec in specs.values()):
        return None
    if len(specs) != len(shardings):
        raise CheckpointError("internal: stacked buffers of one weight with and without shardings")
    mesh = next(iter(shardings.values())).mesh
    return _split_writer(mesh, tuple(sorted(specs.items())))


@functools.lru_cache(maxsize=None)
def _split_writer(mesh, specs: tuple):
    from jax.sharding import PartitionSpec as P

    def local(stacked, values, layer):
        out = {}
        for k, spec in specs:
            s, v = stacked[k], values[k]
            i = layer - jax.lax.axis_index(spec[0]) * s.shape[0]      # the layer's local index
            held = (i >= 0) & (i < s.shape[0])
            i = jnp.clip(i, 0, s.shape[0] - 1)
            v = jnp.where(held, v.astype(s.dtype), jax.lax.dynamic_index_in_dim(s, i, 0, False))
            out[k] = jax.lax.dynamic_update_index_in_dim(s, v, i, 0)
        return out
    stacked = {k: P(*spec) for k, spec in specs}
    values = {k: P(*spec[1:]) for k, spec in specs}
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(stacked, values, P()),
                                 out_specs=stacked, check_vma=False), donate_argnums=0)


def _init_missing(model, build, sharding_of, is_missing):
    """Create the variables no file holds (LoRA adapters, RNG streams) by ``build``'s own init,
    jitted with ``out_shardings`` so each device makes only its shards."""
    flat = nnx.to_flat_state(nnx.state(model))
    missing = {tuple(p) for p, v in flat if is_missing(v)}
    if not missing:
        return
    only = lambda path, _: tuple(path) in missing  # noqa: E731
    targets = [(p, v.replace(sharding_of(tuple(p), v))) for p, v in flat if tuple(p) in missing]
    shards = None if any(v.get_value() is None for _, v in targets) else nnx.from_flat_state(targets)
    created = jax.jit(lambda: nnx.state(build(), only), out_shardings=shards)()
    nnx.update(model, created)
