"""Streaming import of HF safetensors checkpoints into the medjax Decoder.

The model is first built abstractly (``nnx.eval_shape``, no memory), optionally already wrapped
(LoRA) and quantized (QLoRA) by ``prepare``; each parameter is then read from disk, transformed
(explicit transposes from ``names.py``), checked against the expected shape and placed before
the next one is read. With a sharding, each process computes the distinct blocks its devices
hold and reads each one once, only its bytes (a rectangle of the HF matrix), copies it to the
devices that hold it and drops it: no device holds more than its shards plus the tensor in
flight, and the host at most one block beyond the devices. Quantized targets are quantized as
they are read, in bounded column chunks; the float weights of a QLoRA base never all exist.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from medjax.errors import CheckpointError
from medjax.hf.names import IGNORED_SUFFIXES, Part, Source, param_sources
from medjax.hf.safetensors_io import (TensorInfo, check_weight_map, find_weight_files,
                                     index_tensors)
from medjax.models import Decoder, ModelConfig, abstract_decoder
from medjax.models.stack import split_layer_path

ShardingFn = Callable[[tuple, tuple], "jax.sharding.Sharding | None"]


def read_hf_config(directory: Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (is this a Hugging Face model directory?)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if hf.get("auto_map"):
        # remote code is never run; the architecture must be one medjax implements itself
        hf = {k: v for k, v in hf.items() if k != "auto_map"}
    try:
        return ModelConfig.from_hf_config(hf)
    except ValueError as e:          # inconsistent values (e.g. num_experts_per_tok > experts)
        raise CheckpointError(f"{path}: {e}") from None


def _check_names(cfg, sources: Mapping[tuple, Source], tensors: Mapping[str, TensorInfo]):
    needed = {p.hf_name for s in sources.values() for p in s.parts}
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(n for n in tensors if n not in needed and n not in ignorable
                        and not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        n = unexpected[0]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{tensors[n].file}: unexpected tensor {n!r}{more} for a "
                              f"{cfg.architecture} model with this config.json")
    missing = sorted(needed - set(tensors))
    if missing:
        files = sorted({str(t.file) for t in tensors.values()})
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r}{more} in {', '.join(files)}")


def _part_shape(part: Part, info: TensorInfo, expected: tuple, intermediate: int) -> tuple:
    """Expected on-disk shape of one part, to fail before reading any data."""
    if part.transform == "copy":
        want = expected
    elif part.transform == "t":
        inner = expected[1:] if part.expert is not None else expected
        want = tuple(reversed(inner))
    elif part.transform == "t_last2":
        want = expected[:-2] + (expected[-1], expected[-2])
    else:  # fused gate_up_proj [E, 2I, H]
        want = (expected[0], 2 * intermediate, expected[1])
    if tuple(info.shape) != want:
        raise CheckpointError(f"{info.file}: tensor {info.name!r} has shape {list(info.shape)}, "
                              f"expected {list(want)} from config.json")
    if not jnp.issubdtype(info.dtype, jnp.floating):
        raise CheckpointError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, expected "
                              "a floating-point dtype (F32/F16/BF16)")
    return want


def _whole(index, shape) -> tuple:
    """``index`` as one ``slice(start, stop)`` per dim (what a sharding's device index means)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


READ_CHUNK_BYTES = 16 * 2 ** 20    # file bytes read at once while filling a block


def _fill(out: np.ndarray, info: TensorInfo, rows: slice, cols: slice, *, lead=None,
          transpose: bool = False) -> None:
    """``out[...] = W[rows, cols]`` (or its transpose), read in row chunks of bounded size and
    cast into ``out`` (already in the target dtype, C-contiguous): no full-size raw copy."""
    width = (cols.stop - cols.start) * info.dtype.itemsize
    step = max(1, READ_CHUNK_BYTES // max(width, 1))
    for r0 in range(rows.start, rows.stop, step):
        r1 = min(r0 + step, rows.stop)
        w = info.read_region(slice(r0, r1), cols, lead)
        if transpose:
            out[:, r0 - rows.start:r1 - rows.start] = w.T
        else:
            out[r0 - rows.start:r1 - rows.start] = w


def read_block(src: Source, tensors, index: tuple, shape: tuple, intermediate: int,
               dtype=np.float32) -> np.ndarray:
    """``param[index]`` in ``dtype`` read from disk, touching only the bytes of that block.

    Every transform of ``names.py`` maps a block of the medjax param to a rectangle of a 2-D HF
    matrix (per expert for stacked weights), which ``TensorInfo.read_region`` reads alone.
    """
    idx = _whole(index, shape)
    out = np.empty(tuple(s.stop - s.start for s in idx), dtype)
    parts = src.parts
    if parts[0].expert is not None:                 # stacked experts [E, in, out], each HF [out, in]
        for j, e in enumerate(range(idx[0].start, idx[0].stop)):
            _fill(out[j], tensors[parts[e].hf_name], idx[2], idx[1], transpose=True)
        return out
    part = parts[0]
    info = tensors[part.hf_name]
    if part.transform == "copy":
        if len(shape) == 2:
            _fill(out, info, idx[0], idx[1])
        else:
            out[...] = info.read(rows=idx[0])[(slice(None),) + idx[1:]]
        return out
    if part.transform == "t":                       # kernel [in, out] = HF weight [out, in].T
        _fill(out, info, idx[1], idx[0], transpose=True)
        return out
    # stacked on disk: down_proj [E, I, H] = HF [E, H, I] swapped; gate/up halves of HF
    # gate_up_proj [E, 2I, H]
    offset = {"t_last2": 0, "gate_half": 0, "up_half": intermediate}[part.transform]
    rows = slice(idx[2].start + offset, idx[2].stop + offset)
    for j, e in enumerate(range(idx[0].start, idx[0].stop)):
        _fill(out[j], info, rows, idx[1], lead=e, transpose=True)
    return out


def place_blocks(shape: tuple, sharding, read: Callable[[tuple], np.ndarray]) -> jax.Array:
    """A global array from per-device blocks, each distinct block read ONCE per process.

    Devices of this process that hold the same block (replicas over data/tensor axes) share one
    read; blocks are read, copied to their devices and dropped one at a time, so the host holds
    at most one block beyond what the devices hold.
    """
    by_block: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop) for s in _whole(index, shape))
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


def load_hf_dir(directory, *, dtype=jnp.float32, param_dtype=None, shardings: ShardingFn | None = None,
                attention_impl: str = "auto", progress: bool = True, prepare=None, mesh=None,
                rules=None, on_tensor=None, scan_layers: bool = False) -> Decoder:
    """Build a Decoder from an HF directory (config.json + safetensors, single or sharded).

    ``prepare(model)`` transforms the decoder in place before any weight exists (LoRA wrapping, QLoRA
    quantization, NEFTune: it runs on the abstract model); quantized targets are quantized
    tensor by tensor as they are read (``quant.quantize_streaming``), so the float model never
    exists. Variables the file does not hold (adapters, RNG state) are created by a jitted init
    with ``out_shardings``. ``mesh`` + ``rules`` place every variable by the sharding rules
    (``shardings`` is the older per-param callable). ``on_tensor(path)`` runs after each
    tensor lands (memory sampling in tests). ``scan_layers``: the stacked-layer layout, each
    layer's tensor read into index ``i`` of its stacked variable (models/stack.py).
    """
    directory = Path(directory)
    cfg = read_hf_config(directory)
    tensors = index_tensors(find_weight_files(directory))
    check_weight_map(directory, tensors)
    sources = param_sources(cfg, set(tensors))
    _check_names(cfg, sources, tensors)
    loader = StreamingLoader(cfg, sources, dtype=dtype, param_dtype=param_dtype or dtype,
                             attention_impl=attention_impl, prepare=prepare,
                             sharding_of=sharding_fn(shardings, mesh, rules), scan_layers=scan_layers)
    I = cfg.intermediate_size
    bar = tqdm(total=len(sources), desc=f"loading {directory.name}", unit="tensor",
               disable=not progress, leave=False)
    for path, src in sources.items():
        shape = loader.shape(path)
        for part in src.parts:
            _part_shape(part, tensors[part.hf_name], shape, I)
        loader.fill(path, lambda idx, dt, src=src, shape=shape: read_block(src, tensors, idx, shape, I, dt))
        if on_tensor is not None:
            on_tensor(path)
        bar.update()
    bar.close()
    loader.model.source_path = str(directory.resolve())
    return loader.model


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
    if all(isinstance(v, jax.Array) for v in stacked.values()):
        written = _write_layer(stacked, placed, layer)
    else:                                   # abstract until the first layer: create and write
        structs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in stacked.items()}
        written = jax.jit(functools.partial(_new_stack, structs), out_shardings=shardings)(placed, layer)
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
    """One layer's sharding from its stacked variable's (whose ``layers`` axis is never split)."""
    if sharding is None:
        return None
    spec = tuple(sharding.spec)
    if spec and spec[0] is not None:
        raise CheckpointError(f"internal: a stacked variable is split over its layers axis ({spec})")
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))


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


def checkpoint_nbytes(directory) -> int:
    return sum(math.prod(t.shape) * t.dtype.itemsize
               for t in index_tensors(find_weight_files(directory)).values())
