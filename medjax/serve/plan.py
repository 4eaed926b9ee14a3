"""The planner's serving lines: KV pages that fit beside a model's weights on one device.

``python -m medjax.plan --serve`` prints, for Llama-3-8B (bf16 weights and KV cache, pages of 16
tokens) on one H100 and on one v5e chip, the pool ``python -m medjax.serve`` would allocate
there (``budget.pool_bytes``: the device memory times the planner's headroom, less the weights,
less the activation reserve) and how many tokens of context that is.
"""
from __future__ import annotations

import jax.numpy as jnp

from medjax.models import get_preset
from medjax.models.presets import PUBLISHED_PARAMS
from medjax.serve.budget import pool_bytes
from medjax.serve.pages import page_bytes

GiB = 2 ** 30


def kv_pages_lines(device_bytes: dict[str, float], headroom: float, *, model: str = "llama3-8b",
                   weight_bytes_per_param: float = 2, page_size: int = 16) -> list[str]:
    cfg = get_preset(model)
    weights = PUBLISHED_PARAMS[model] * weight_bytes_per_param
    per_page = page_bytes(cfg, page_size, jnp.bfloat16)
    note = "" if weight_bytes_per_param >= 2 else "; medjax.serve loads float weights today"
    lines = [f"serving {model} (weights {weights / GiB:.1f} GiB at {weight_bytes_per_param:g} B/param, "
             f"bf16 KV, {page_size}-token pages of {per_page / 2**20:.2f} MiB{note}):"]
    for name, total in device_bytes.items():
        pool = pool_bytes(total, weights, headroom)
        pages = int(pool // per_page)
        if pages == 0:
            lines.append(f"  {name} ({total / GiB:.0f} GiB): no page fits: the weights alone take "
                         f"{weights / GiB:.1f} of {total * headroom / GiB:.1f} GiB usable; shard "
                         f"them over more chips (mesh.tensor) or quantize")
            continue
        tokens = pages * page_size
        lines.append(f"  {name} ({total / GiB:.0f} GiB): {pages} pages = {tokens} tokens of KV "
                     f"({pool / GiB:.1f} GiB), e.g. {tokens // 8192} sequences of 8k tokens")
    return lines


def kv_pages_report(device_bytes: dict[str, float], headroom: float) -> str:
    """Llama-3-8B in bf16, then with int8 weights (the v5e's 16 GiB cannot hold the bf16 ones)."""
    return "\n".join(kv_pages_lines(device_bytes, headroom)
                     + kv_pages_lines(device_bytes, headroom, weight_bytes_per_param=1))
