"""Export a Decoder to a directory that ``transformers`` loads unchanged.

Writes config.json (both rope keys), generation_config.json, safetensors (sharded with an index
above ``max_shard_bytes``) and the tokenizer files. Everything goes to a temporary sibling
directory that is renamed into place at the end, so a crash or a full disk never leaves a
half-written model under the final name (the temporary directory is removed on any error); the directory the model was loaded from is never overwritten.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from medjax.errors import CheckpointError
from medjax.hf.names import export_shapes, export_tensors
from medjax.hf.safetensors_io import write_safetensors
from medjax.models.stack import per_layer_flat, read_value, value_shape
from medjax.outputs import replace_dir, temp_dir_beside
from medjax.sharding import host_value

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _generation_config(cfg) -> dict:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id, "do_sample": False}


def save_hf(model, out_dir, *, tokenizer=None, dtype: str = "float32",
            max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) as an HF directory at ``out_dir``; returns the path."""
    out = Path(out_dir).resolve()
    source = getattr(model, "source_path", None)
    if source is not None and Path(source).resolve() == out:
        raise CheckpointError(f"refusing to export into {out}: the model was loaded from there")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty: pass overwrite=True to replace it "
                              f"(python -m medjax.export: --overwrite)")
    if dtype not in _NP_DTYPES:
        raise ValueError(f"export dtype {dtype!r} not in {list(_NP_DTYPES)}")
    cfg = model.config
    flat = per_layer_flat(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    np_dtype = _NP_DTYPES[dtype]
    is_writer = jax.process_index() == 0

    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]   # removed on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    if is_writer:  # leftovers of an export that was killed before its final rename
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_dir_beside(out) if is_writer else None          # the umask's mode, not mkdtemp's 0700
    try:
        # Shards are planned from shapes, then each tensor is made only as its bytes are written:
        # the host holds one tensor (one layer's slice) beyond the model, never a 5 GiB shard.
        itemsize = np.dtype(np_dtype).itemsize
        shapes = list(export_shapes(cfg, lambda p: value_shape(flat[p])))
        planned, shard_bytes, total = [[]], 0, 0
        for name, shape in shapes:
            nbytes = math.prod(shape) * itemsize
            if planned[-1] and shard_bytes + nbytes > max_shard_bytes:
                planned, shard_bytes = planned + [[]], 0
            planned[-1].append((name, shape))
            shard_bytes, total = shard_bytes + nbytes, total + nbytes
        arrays = export_tensors(cfg, lambda p, index=(): host_value(read_value(flat[p], index)))

        def tensor_bytes(name):
            got, arr = next(arrays)         # every process pulls each tensor (gathers are collective)
            if got != name:
                raise CheckpointError(f"internal: export order {got!r} != planned {name!r}")
            yield arr.astype(np_dtype, copy=False)

        shards = []
        for i, group in enumerate(planned):
            file = f"model-{i + 1:05d}.safetensors"
            entries = [(name, np_dtype, shape, tensor_bytes(name)) for name, shape in group]
            if is_writer:
                write_safetensors(tmp / file, entries)
            else:
                for *_, chunks in entries:
                    for _ in chunks:
                        pass
            shards.append((file, [name for name, _ in group]))
        if not is_writer:
            return out
        if len(shards) == 1:
            os.replace(tmp / shards[0][0], tmp / "model.safetensors")
        else:
            n = len(shards)
            weight_map = {}
            for i, (old, names) in enumerate(shards):
                new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(tmp / old, tmp / new)
                weight_map.update({k: new for k in names})
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config(dtype), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(cfg), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        replace_dir(tmp, out)
        tmp = None
        return out
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            for parent in made:          # nothing left behind: the folders this call created
                try:
                    parent.rmdir()
                except OSError:          # not empty (another writer's files) or already gone
                    break
