"""``medjax.load``: the one loader — an HF directory, a ``.gguf`` file or a training run → (Decoder, Tokenizer).

    model, tokenizer = medjax.load("path/to/hf_dir")          # or model.gguf, or runs/demo
    run = load_run("runs/demo", mesh_overrides=["mesh.preset=fsdp"])   # + its config and step

A training run is its ``train.out_dir`` or that directory's ``checkpoints/``
(:func:`run_checkpoints` says which path is one); it is rebuilt from its newest readable
checkpoint exactly as it trained (``train/restore.py``), on its own mesh unless ``mesh.*``
overrides say otherwise. HF directories and GGUF files go through ``hf/pretrained.py``.
This module sits above train and eval (docs/ARCHITECTURE.md): every CLI that takes a model path
(``medjax.eval``, ``medjax.export``, ``medjax.generate``, ``medjax.arena``) loads through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medjax.errors import CheckpointError, ConfigError
from medjax.paths import resolve_path


@dataclass(frozen=True)
class TrainedRun:
    """A run's model rebuilt from a checkpoint, with the run config it trained under."""
    model: Any                  # as trained: LoRA wrappers / quantized bases in place
    tokenizer: Any
    config: Any                 # medjax.config.RunConfig (``config.mesh`` after the overrides)
    step: int
    checkpoint_dir: Path


def run_checkpoints(path) -> Path | None:
    """The checkpoint directory of a training run given as its out_dir or as that ``checkpoints/``
    directory; None for anything else (an HF directory has a ``config.json``, a GGUF is a file)."""
    p = resolve_path(path)
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if p.name == "checkpoints" or any(c.is_dir() and c.name.isdigit() for c in p.iterdir()):
        return p                                              # orbax: one folder per step
    return None


def checkpoint_dir(path) -> Path:
    """:func:`run_checkpoints`, or a CheckpointError naming a path that is not a run."""
    ckpt = run_checkpoints(path)
    if ckpt is None:
        p = resolve_path(path)
        why = "no such checkpoint directory" if not p.exists() else \
            "not a training run (its directory or its checkpoints/ directory)"
        raise CheckpointError(f"{why}: {p}")
    return ckpt


def load_run(path, step: int | None = None, mesh_overrides=()) -> TrainedRun:
    """The run at ``path`` (out_dir or ``checkpoints/``) at ``step`` (default: the newest readable
    checkpoint); ``mesh_overrides`` are ``mesh.key=value`` flags."""
    ckpt = checkpoint_dir(path)
    from medjax.train.restore import restore_trained_model
    model, tokenizer, cfg, got = restore_trained_model(ckpt, step, mesh_overrides)
    return TrainedRun(model, tokenizer, cfg, got, ckpt)


def load(path, dtype=None, *, step: int | None = None, mesh_overrides=(), merge_adapters=True,
         **pretrained):
    """``(model, tokenizer)`` from an HF directory, a ``.gguf`` file or a training run.

    HF / GGUF: ``dtype`` (default float32) and ``pretrained`` (``param_dtype``, ``mesh`` +
    ``rules``, ``prepare``, ``scan_layers``, ...) go to ``hf.pretrained.load_pretrained``.
    A run is rebuilt in its own ``model.dtype`` and layout (``dtype`` may only repeat it: else a
    ConfigError), at ``step``, on its mesh changed by ``mesh_overrides``; with
    ``merge_adapters`` (default) LoRA adapters are merged onto the (dequantized) base, as
    ``python -m medjax.export`` writes it.
    """
    if run_checkpoints(path) is None:
        import jax.numpy as jnp

        from medjax.hf.pretrained import load_pretrained
        return load_pretrained(path, jnp.float32 if dtype is None else dtype, **pretrained)
    run = load_run(path, step, mesh_overrides)
    if dtype is not None and jnp_name(dtype) != run.config.model.dtype:
        raise ConfigError(f"dtype {jnp_name(dtype)}: the run {run.checkpoint_dir} is rebuilt in its "
                          f"model.dtype={run.config.model.dtype}; export it (python -m medjax.export) "
                          f"to load it in another dtype")
    if not merge_adapters:
        return run.model, run.tokenizer
    from medjax.train.setup import plain_model
    return plain_model(run.model, keep=False), run.tokenizer


def jnp_name(dtype) -> str:
    """``jnp.bfloat16`` / ``"bfloat16"`` / ``np.dtype`` → ``"bfloat16"``."""
    import numpy as np
    return np.dtype(dtype).name if not isinstance(dtype, str) else dtype
