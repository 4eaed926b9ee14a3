"""Large random HF checkpoints for the memory tests, written one tensor at a time (the writer
never holds the model), in the safetensors layout medjax reads."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from medjax.models import ModelConfig

_DTYPES = {"bfloat16": ("BF16", ml_dtypes.bfloat16), "float32": ("F32", np.float32)}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """HF tensor name -> on-disk shape, from medjax's own name table."""
    from flax import nnx

    from medjax.hf.names import param_sources
    from medjax.models import abstract_decoder
    flat = dict(nnx.to_flat_state(nnx.state(abstract_decoder(cfg), nnx.Param)))
    shapes = {}
    for path, src in param_sources(cfg).items():
        shape = tuple(flat[path].get_value().shape)
        for part in src.parts:                    # "copy" keeps the shape, "t" reverses [in, out]
            inner = shape[1:] if part.expert is not None else shape
            shapes[part.hf_name] = inner if part.transform == "copy" else tuple(reversed(inner))
    return shapes


def write_random_checkpoint(cfg: ModelConfig, out, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """``out/model.safetensors`` + ``config.json`` with N(0, 0.02) weights (norms 1 + N(0, 0.1))."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tag, np_dtype = _DTYPES[dtype]
    shapes = hf_shapes(cfg)
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            if "norm" in name:
                w = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            else:
                w = 0.02 * rng.standard_normal(shape, dtype=np.float32)
            f.write(w.astype(np_dtype).tobytes())
            del w
    (out / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    return out
