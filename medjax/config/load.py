"""Loading the run config: YAML files merged in order, ``model=tiny``, then ``key=value`` overrides.

One language for every command that takes ``--config``: files merge in order (``--config base.yaml
--config overlay.yaml``: a later file's mappings merge into the earlier ones key by key, its other
values replace), then ``key=value`` overrides. Unknown keys are rejected with the closest valid
name, and a key that was replaced names its replacement; values are type-checked against the
dataclass annotations (``int`` accepted where ``float`` is expected). :func:`load_config` is the
one loader.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from medjax.config.sections import MeshSection, RunConfig, did_you_mean
from medjax.config.tiny import TINY_DIR, tiny_overlay, tiny_run_parts
from medjax.errors import ConfigError

# Keys that were removed, and what replaced them (None: nothing; the text says what to do).
REPLACED_KEYS = {
    "train.heldout_examples": "data.heldout_rows",
    "train.max_examples": "data.max_rows",
    "train.eval_mcqa": None,
}
_REMOVED_HOW = {"train.eval_mcqa": "list benchmark tasks in eval.tasks (scored after training)"}




def _coerce(key: str, value: Any, annotation) -> Any:
    """Check ``value`` against a dataclass field annotation; light coercion (int→float, list→tuple)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is tuple or origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return tuple(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected bool, got {type(value).__name__} {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls, data: dict, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        if prefix + k in REPLACED_KEYS:
            new = REPLACED_KEYS[prefix + k]
            how = f"use {new!r} instead" if new else _REMOVED_HOW[prefix + k]
            raise ConfigError(f"config key {prefix + k!r} was removed: {how}")
        raise ConfigError(f"unknown config key {prefix + k!r}{did_you_mean(k, fields)}")
    kwargs = {}
    for name, value in data.items():
        ann = hints[name]
        if dataclasses.is_dataclass(ann):
            kwargs[name] = build(ann, value or {}, prefix + name + ".")
        else:
            kwargs[name] = _coerce(prefix + name, value, ann)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required section is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else None


def apply_overrides(data: dict, overrides) -> dict:
    data = _deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def _deepcopy(d):
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` on ``base``: mappings merge key by key, any other value replaces."""
    out = _deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = _deepcopy(value) if isinstance(value, dict) else value
    return out


def read_yaml(path) -> dict:
    """One config file as a dict (a ``ConfigError`` naming the file if it is missing or bad)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def config_paths(path) -> list:
    """``None`` / one path / a list of paths (``--config`` given several times) → a list."""
    if path is None:
        return []
    return list(path) if isinstance(path, (list, tuple)) else [path]


def mesh_overrides(overrides, base: "MeshSection | None" = None) -> "MeshSection":
    """The ``mesh.*`` ``key=value`` flags of ``python -m medjax.eval`` / ``export`` (the run
    config's mesh keys: ``mesh.preset=fsdp mesh.fsdp=4``) applied to ``base`` (default: the
    ``dp`` preset over every device)."""
    other = [o for o in overrides if not str(o).startswith("mesh.")]
    if other:
        raise ConfigError(f"{other[0]!r}: only mesh.* settings are accepted here "
                          f"(e.g. mesh.preset=fsdp mesh.fsdp=4)")
    data = apply_overrides({"mesh": dataclasses.asdict(base or MeshSection())}, overrides)
    return build(MeshSection, data["mesh"], "mesh.")


def explicit_steps_win(overrides) -> list:
    """``train.steps=N`` given as an override ends an epoch count set in a config file (a recipe's
    ``train.epochs: 3`` would otherwise decide the length and silently ignore it); both given as
    overrides is a ConfigError naming the two keys."""
    overrides = list(overrides)
    given = {".".join(keys): value for keys, value in map(parse_override, (o for o in overrides if "=" in o))}
    if "train.steps" not in given:
        return overrides
    if given.get("train.epochs") is not None:
        raise ConfigError(f"train.steps={given['train.steps']} and train.epochs={given['train.epochs']} "
                          f"both given: the run length is one or the other; drop one of them")
    return overrides + ["train.epochs=null"]


def _check_recipe_inputs(final: dict, config_path) -> None:
    if not (final.get("train") or {}).get("recipe"):
        return
    model, data = final.get("model") or {}, final.get("data") or {}
    preset = str(model.get("preset"))
    if model.get("path") is None and not preset.startswith("tiny"):
        raise ConfigError(f"{config_path}: model.path is required: give the card's base model "
                          f"(a local HF directory) as model.path=..., or add model=tiny for a "
                          f"CPU-sized run of the same recipe")
    if data.get("train") is None and not data.get("sources"):
        raise ConfigError(f"{config_path}: data.train is required: give your training data as "
                          f"data.train=FILE (format {data.get('format', 'text')!r}), or add "
                          f"model=tiny for a CPU-sized run on stand-in data")


def load_config(path=None, overrides=(), *, check_inputs: bool = False) -> RunConfig:
    """The ``RunConfig`` of YAML file(s) ``path`` (one or a list, merged in order) and ``key=value``
    overrides: the one loader of every command that takes ``--config``.

    ``model=tiny`` among the overrides adds the family's tiny overlay (``configs/tiny/<family>.yaml``)
    after the files. With a tiny overlay among the files (added so, or given),
    :func:`~medjax.config.tiny.tiny_run_parts` of the recipe (the first file) goes on top of them;
    the overrides come last and win. ``train.steps=N`` among the overrides wins over
    ``train.epochs`` from the files (:func:`explicit_steps_win`). ``check_inputs`` (training): for
    a recipe config (``train.recipe`` set, not tiny), a missing base-model path or training data
    is a ``ConfigError`` saying what to set (instead of a random full-size init)."""
    paths, overrides = config_paths(path), explicit_steps_win(overrides)
    raw: dict = {}
    for p in paths:
        raw = merge(raw, read_yaml(p))
    if "model=tiny" in overrides:
        overrides.remove("model=tiny")
        if not paths:
            raise ConfigError("model=tiny needs --config (a recipe whose model.preset names the family)")
        overlay = tiny_overlay(raw)
        paths.append(overlay)
        raw = merge(raw, read_yaml(overlay))
    if any(Path(p).resolve().parent == TINY_DIR for p in paths):
        raw = merge(raw, tiny_run_parts(apply_overrides(raw, overrides), Path(paths[0]).stem))
    final = apply_overrides(raw, overrides)
    if check_inputs and paths:
        _check_recipe_inputs(final, paths[0])
    return build(RunConfig, final)
