"""Optax optimizer and learning-rate schedules built from ``OptimSection``.

Schedules all start with a linear warmup from 0 to ``lr`` over ``warmup_steps`` and then
decay to ``min_lr`` at ``total_steps`` (cosine, linear) or stay at ``lr`` (constant).
Decoupled weight decay skips norms, biases and 1-D params (the usual HF Trainer rule).
Global-norm clipping runs first, on the raw (fp32) gradients.
"""
from __future__ import annotations

import jax
import optax

from medjax.config import OptimSection

_NO_DECAY_WORDS = ("norm", "bias")


def make_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr / cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, cfg.min_lr, decay_steps)
    else:
        after = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return after
    ramp = optax.linear_schedule(0.0, cfg.lr, warmup)
    return optax.join_schedules([ramp, after], boundaries=[warmup])


def _path_names(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts).lower()


def decay_mask(params):
    """True where weight decay applies: matrices that are not norms/biases."""
    def is_decayed(path, leaf):
        name = _path_names(path)
        return getattr(leaf, "ndim", 0) >= 2 and not any(w in name for w in _NO_DECAY_WORDS)
    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg: OptimSection, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Return ``(tx, schedule)``; ``tx`` includes clipping and (masked) weight decay."""
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.name == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, mask=decay_mask))
    else:
        parts.append(optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None,
                                     weight_decay_mask=decay_mask))
    tx = optax.chain(*parts)
    if cfg.skip_nonfinite:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=5)
    return tx, schedule
