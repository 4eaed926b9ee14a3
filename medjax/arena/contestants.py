"""``--models NAME=PATH,...``: parse the list and load each model with the existing loaders.

A PATH is an HF directory or a ``.gguf`` file (``medjax.load``), or a training run (its
directory or its ``checkpoints/`` directory), rebuilt as ``python -m medjax.export`` does
(``restore_trained_model``) with LoRA adapters merged for generation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from medjax.arena.errors import ArenaError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Contestant:
    name: str
    path: str


def parse_models(text: str) -> list[Contestant]:
    """``"a=path1,b=path2"`` → contestants; at least two, distinct names."""
    contestants: list[Contestant] = []
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        name, sep, path = part.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ArenaError(f"--models: {part!r} is not NAME=PATH")
        if not _NAME.match(name):
            raise ArenaError(f"--models: name {name!r} may hold only letters, digits and _ . + -")
        if any(c.name == name for c in contestants):
            raise ArenaError(f"--models: the name {name!r} is given twice")
        contestants.append(Contestant(name, path))
    if len(contestants) < 2:
        got = ", ".join(c.name for c in contestants) or "none"
        raise ArenaError(f"--models: an arena needs at least two models to compare, got "
                         f"{len(contestants)} ({got})")
    return contestants


def run_checkpoint_dir(path) -> Path | None:
    """The ``checkpoints`` directory when ``path`` is a training run (or that directory)."""
    from medjax.loading import resolve_path
    p = resolve_path(path)
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    if any(child.is_dir() and child.name.isdigit() for child in p.iterdir()):
        return p
    return None


def load_model(path, dtype):
    """``(model, tokenizer)`` for an HF dir, a GGUF file or a training run."""
    ckpt = run_checkpoint_dir(path)
    if ckpt is None:
        import medjax
        model, tokenizer = medjax.load(path, dtype=dtype)
    else:
        from medjax.training.loop import restore_trained_model
        model, tokenizer, cfg, _ = restore_trained_model(ckpt)
        if cfg.lora.enabled:
            from medjax.lora import merged_model
            from medjax.quant import dequantize_model
            model = merged_model(dequantize_model(model))
    if tokenizer is None:
        raise ArenaError(f"{path}: no tokenizer files next to the model")
    return model, tokenizer
