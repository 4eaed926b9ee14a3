"""A pretrained model on disk — an HF directory (safetensors) or a ``.gguf`` file — as
``(Decoder, Tokenizer)``: the one loader of weight files. ``medjax.load`` (medjax/loading.py)
adds training runs on top; a run's own base model loads through here too (train/setup.py)."""
from __future__ import annotations

import warnings
from pathlib import Path

import jax.numpy as jnp

from medjax.errors import CheckpointError
from medjax.paths import resolve_path


def is_gguf(path: Path) -> bool:
    """A ``.gguf`` file (anything else that is a file is not a model)."""
    return path.is_file() and path.suffix == ".gguf"


def load_pretrained(path, dtype=jnp.float32, *, param_dtype=None, shardings=None,
                    attention_impl="auto", progress=True, prepare=None, mesh=None, rules=None,
                    on_tensor=None, scan_layers=False):
    """Load ``(model, tokenizer)`` from an HF directory (safetensors) or a ``.gguf`` file.

    ``mesh`` + ``rules`` (medjax.sharding) import straight into the training layout, each
    process reading each block it needs once; ``prepare(model)`` wraps/quantizes the abstract
    model first (LoRA, QLoRA: weights are quantized as they stream in). See hf/load.py.
    ``scan_layers`` builds the stacked-layer layout (models/stack.py). ``tokenizer`` is None
    (with a warning) for an HF directory without tokenizer files.
    """
    p = resolve_path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if is_gguf(p):
        from medjax.hf.gguf import load_gguf
        from medjax.hf.fill import sharding_fn
        return load_gguf(p, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                         prepare=prepare, sharding_of=sharding_fn(shardings, mesh, rules),
                         scan_layers=scan_layers)
    if p.is_file():
        raise CheckpointError(f"{p}: expected an HF model directory or a .gguf file")
    from medjax.hf.load import load_hf_dir
    model = load_hf_dir(p, dtype=dtype, param_dtype=param_dtype, shardings=shardings,
                        attention_impl=attention_impl, progress=progress, prepare=prepare,
                        mesh=mesh, rules=rules, on_tensor=on_tensor, scan_layers=scan_layers)
    return model, _load_tokenizer(p)


def _load_tokenizer(directory: Path):
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        warnings.warn(f"{directory}: no tokenizer.json or tokenizer.model; tokenizer is None")
        return None
    from medjax.tokenizer import load_tokenizer
    return load_tokenizer(directory)
