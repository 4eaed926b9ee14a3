"""Streaming import of HF safetensors checkpoints into the medjax Decoder: the safetensors reader.

Each parameter is read from disk, transformed (explicit transposes from ``names.py``), checked
against the expected shape and handed to the fill engine (``hf/fill.py``: ``StreamingLoader``)
before the next one is read. A block read is only its bytes (a rectangle of the HF matrix),
in chunks of ``READ_CHUNK_BYTES``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from medjax.errors import CheckpointError
from medjax.hf.fill import ShardingFn, StreamingLoader, sharding_fn, whole_slices
from medjax.hf.names import IGNORED_SUFFIXES, Part, Source, param_sources
from medjax.hf.safetensors_io import (TensorInfo, check_weight_map, find_weight_files,
                                     index_tensors)
from medjax.models import Decoder, ModelConfig


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
    idx = whole_slices(index, shape)
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


def checkpoint_nbytes(directory) -> int:
    return sum(math.prod(t.shape) * t.dtype.itemsize
               for t in index_tensors(find_weight_files(directory)).values())
