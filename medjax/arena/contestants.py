"""``--models NAME=PATH,...``: parse the list; each model loads with ``medjax.load``.

A PATH is an HF directory, a ``.gguf`` file or a training run (its directory or its
``checkpoints/`` directory), which ``medjax.load`` rebuilds as ``python -m medjax.export`` does,
LoRA adapters merged for generation.
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
    from medjax.paths import resolve_path
    for option, path in [(f"--models {c.name}", c.path) for c in contestants] + [("--judge", judge)]:
        if not resolve_path(path).exists():
            raise ConfigError(f"{option}: {path}: no such file or directory")
