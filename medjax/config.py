"""Run configuration: frozen dataclasses, loaded from YAML with dotted ``key=value`` overrides.

Unknown keys are rejected with the closest valid name; values are type-checked against the
dataclass annotations (``int`` accepted where ``float`` is expected). Each section owns its
validation in ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A user error in a config file or override; the message names the key."""


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class ModelSection:
    path: Optional[str] = None          # HF dir or .gguf; None with a preset = random init
    preset: Optional[str] = None        # e.g. "tiny-llama", "mistral-7b"
    dtype: str = "float32"              # compute dtype
    param_dtype: str = "float32"        # storage dtype of frozen/base params
    attention: str = "auto"             # auto | xla | pallas | cudnn
    remat: str = "none"                 # none | full | dots_saveable

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.param_dtype", self.param_dtype, ("float32", "bfloat16", "float16"))
        _choice("model.attention", self.attention, ("auto", "xla", "pallas", "cudnn"))
        _choice("model.remat", self.remat, ("none", "full", "dots_saveable"))
        if self.path is None and self.preset is None:
            raise ConfigError("model: set model.path (HF dir or .gguf) or model.preset")


@dataclass(frozen=True)
class DataSection:
    train: Optional[str] = None         # file / glob / dir
    eval: Optional[str] = None
    format: str = "text"                # text | alpaca | chat | mcqa | preference
    seq_len: int = 512
    pack: bool = True
    on_error: str = "raise"             # raise | skip
    seed: int = 0

    def __post_init__(self):
        _choice("data.format", self.format, ("text", "alpaca", "chat", "mcqa", "preference"))
        _choice("data.on_error", self.on_error, ("raise", "skip"))
        _positive("data.seq_len", self.seq_len)


@dataclass(frozen=True)
class OptimSection:
    name: str = "adamw"                 # adamw | adafactor
    lr: float = 2e-4
    min_lr: float = 0.0
    schedule: str = "cosine"            # cosine | linear | constant
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: Optional[float] = 1.0
    skip_nonfinite: bool = False

    def __post_init__(self):
        _choice("optim.name", self.name, ("adamw", "adafactor"))
        _choice("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class LoraSection:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    quantize: Optional[str] = None      # None | int8 | nf4  (QLoRA base weights)

    def __post_init__(self):
        if self.enabled:
            _positive("lora.rank", self.rank)
        if self.quantize is not None:
            _choice("lora.quantize", self.quantize, ("int8", "nf4"))


@dataclass(frozen=True)
class MeshSection:
    preset: str = "dp"                  # dp | fsdp | fsdp_tp | fsdp_ep
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1


@dataclass(frozen=True)
class CheckpointSection:
    dir: Optional[str] = None
    every: int = 100
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class EvalSection:
    tasks: tuple = ()
    data_dir: Optional[str] = None
    limit: Optional[int] = None
    every: int = 0


@dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    epochs: Optional[int] = None
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 1

    def __post_init__(self):
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoraSection = field(default_factory=LoraSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- helpers
def _choice(key, value, options):
    if value not in options:
        raise ConfigError(f"{key}: {value!r} is not one of {list(options)}")


def _positive(key, value):
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _suggest(name, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(sorted(options))})"


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
        raise ConfigError(f"unknown config key {prefix + k!r}{_suggest(k, fields)}")
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


def load_config(path=None, overrides=(), cls=RunConfig) -> RunConfig:
    """Load a YAML run config and apply ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    data = apply_overrides(data, overrides)
    return build(cls, data)
