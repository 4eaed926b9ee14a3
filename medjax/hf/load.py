"""Streaming import of HF safetensors checkpoints into the medjax Decoder.

The model is first built abstractly (``nnx.eval_shape``, no memory); each parameter is then
read from disk, transformed (explicit transposes from ``names.py``), checked against the
expected shape and placed on device before the next one is read, so host memory peaks at about
one model plus one tensor. With ``shardings``, each parameter is created with
``jax.make_array_from_callback`` and every device's block reads only the rows it needs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from medjax.hf.names import IGNORED_SUFFIXES, Part, Source, apply_transform, param_sources
from medjax.hf.safetensors_io import CheckpointError, TensorInfo, find_weight_files, index_tensors
from medjax.models import Decoder, ModelConfig, abstract_decoder

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


def _read_block(src: Source, tensors, index: tuple, shape: tuple, intermediate: int) -> np.ndarray:
    """Read ``param[index]`` reading only the rows needed where the layout allows it."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    parts = src.parts
    if parts[0].expert is not None:                       # stacked per-expert Linear weights
        experts = range(*index[0].indices(shape[0]))
        blocks = [tensors[parts[e].hf_name].read(rows=index[2]).T[index[1]] for e in experts]
        return np.stack(blocks)
    part = parts[0]
    info = tensors[part.hf_name]
    if part.transform == "t" and len(shape) == 2:
        return info.read(rows=index[1]).T[index[0]]
    if part.transform == "copy" and len(shape) >= 1:
        return info.read(rows=index[0])[(slice(None),) + index[1:]]
    return apply_transform(part, info.read(), intermediate)[index]


def _read_full(src: Source, tensors, shape, intermediate) -> np.ndarray:
    if src.parts[0].expert is None:
        part = src.parts[0]
        return apply_transform(part, tensors[part.hf_name].read(), intermediate)
    out = None
    for part in src.parts:
        w = apply_transform(part, tensors[part.hf_name].read(), intermediate)
        if out is None:
            out = np.empty(shape, w.dtype)
        out[part.expert] = w
    return out


def load_hf_dir(directory, *, dtype=jnp.float32, param_dtype=None, shardings: ShardingFn | None = None,
                attention_impl: str = "auto", progress: bool = True) -> Decoder:
    """Build a Decoder from an HF directory (config.json + safetensors, single or sharded)."""
    directory = Path(directory)
    cfg = read_hf_config(directory)
    tensors = index_tensors(find_weight_files(directory))
    sources = param_sources(cfg, set(tensors))
    _check_names(cfg, sources, tensors)
    param_dtype = param_dtype or dtype
    model = abstract_decoder(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    I = cfg.intermediate_size
    bar = tqdm(total=len(flat), desc=f"loading {directory.name}", unit="tensor", disable=not progress,
               leave=False)
    for path, var in flat:
        src = sources.get(path)
        if src is None:
            raise CheckpointError(f"internal: no HF source for parameter {'.'.join(map(str, path))}")
        abstract = var.get_value()
        shape, target = tuple(abstract.shape), np.dtype(abstract.dtype)
        for part in src.parts:
            _part_shape(part, tensors[part.hf_name], shape, I)
        sharding = shardings(path, shape) if shardings is not None else None
        if sharding is None:
            arr = jnp.asarray(_read_full(src, tensors, shape, I).astype(target, copy=False))
        else:
            arr = jax.make_array_from_callback(
                shape, sharding,
                lambda idx, src=src, shape=shape: _read_block(src, tensors, idx, shape, I).astype(target))
        var.set_value(arr)
        bar.update()
    bar.close()
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.source_path = str(directory.resolve())
    return model


def checkpoint_nbytes(directory) -> int:
    return sum(math.prod(t.shape) * t.dtype.itemsize
               for t in index_tensors(find_weight_files(directory)).values())
