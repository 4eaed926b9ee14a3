"""``--models NAME=PATH,...``: parse the list and load each model with the existing loaders.

A PATH is an HF directory or a ``.gguf`` file (``medjax.load``), or a training run (its
directory or its ``checkpoints/`` directory), rebuilt as ``python -m medjax.export`` does
(``restore_trained_model``, detected by ``medjax.eval.auto_dtype.model_kind`` as
``python -m medjax.eval`` does) with LoRA adapters merged for generation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from medjax.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Contestant:
    name: str
    path: str
    chat_template: str | None = None     # a built-in template name replacing the model's own


def parse_models(text: str) -> list[Contestant]:
    """``"a=path1,b=path2"`` → contestants; at least two, distinct names."""
    contestants: list[Contestant] = []
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        name, sep, path = part.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--models: {part!r} is not NAME=PATH")
        if not _NAME.match(name):
            raise ConfigError(f"--models: name {name!r} may hold only letters, digits and _ . + -")
        if any(c.name == name for c in contestants):
            raise ConfigError(f"--models: the name {name!r} is given twice")
        contestants.append(Contestant(name, path))
    if len(contestants) < 2:
        got = ", ".join(c.name for c in contestants) or "none"
        raise ConfigError(f"--models: an arena needs at least two models to compare, got "
                         f"{len(contestants)} ({got})")
    return contestants


def with_chat_templates(contestants: list[Contestant], text: str | None) -> list[Contestant]:
    """``--chat-template NAME=TEMPLATE,...``: a built-in chat template for models that ship none
    (or to override theirs)."""
    from dataclasses import replace

    from medjax.chat_templates import BUILTIN_CHAT_TEMPLATES
    chosen = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        name, sep, template = (x.strip() for x in part.partition("="))
        if not sep or name not in {c.name for c in contestants}:
            raise ConfigError(f"--chat-template: {part!r} is not MODEL=TEMPLATE for one of the models "
                             f"({', '.join(c.name for c in contestants)})")
        if template not in BUILTIN_CHAT_TEMPLATES:
            raise ConfigError(f"--chat-template {name}: unknown template {template!r} "
                             f"(built-in: {', '.join(BUILTIN_CHAT_TEMPLATES)})")
        chosen[name] = template
    return [replace(c, chat_template=chosen.get(c.name)) for c in contestants]


def check_paths(contestants: list[Contestant], judge: str) -> None:
    """Every model path exists (checked before the first model loads)."""
    from medjax.loading import resolve_path
    for option, path in [(f"--models {c.name}", c.path) for c in contestants] + [("--judge", judge)]:
        if not resolve_path(path).exists():
            raise ConfigError(f"{option}: {path}: no such file or directory")


def load_model(path, dtype):
    """``(model, tokenizer)`` for an HF dir, a GGUF file or a training run."""
    from medjax.eval.auto_dtype import model_kind
    from medjax.loading import resolve_path

    resolved = resolve_path(path)
    if model_kind(resolved) != "run":
        import medjax
        model, tokenizer = medjax.load(resolved, dtype=dtype)
    else:
        from medjax.train.loop import restore_trained_model
        ckpt = resolved / "checkpoints" if (resolved / "checkpoints").is_dir() else resolved
        from medjax.train.setup import plain_model
        model, tokenizer, _, _ = restore_trained_model(ckpt)      # in the run's model.dtype
        model = plain_model(model)                                # LoRA merged, as export does
    if tokenizer is None:
        raise ConfigError(f"{path}: no tokenizer files next to the model")
    return model, tokenizer
