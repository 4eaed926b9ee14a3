"""How much memory the KV page pool may take: a flag, else what the device has left."""
from __future__ import annotations

import os

import jax

CPU_DEFAULT_BYTES = 1 << 30          # 1 GiB, or a quarter of the host's RAM if that is less
DEVICE_HEADROOM = 0.9                # of the device's memory, as medjax.plan budgets it
ACTIVATION_RESERVE = 0.1             # of what the weights leave, kept for activations/logits


def host_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def params_bytes(model) -> int:
    from flax import nnx
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))


def kv_budget_bytes(model, requested_gib: float | None, device=None) -> tuple[float, str]:
    """``(bytes, why)`` for the page pool: ``requested_gib`` when given; on CPU 1 GiB (at most a
    quarter of RAM); on an accelerator the device's memory limit (``memory_stats``) times the
    planner's headroom, less the weights, less a reserve for activations."""
    if requested_gib is not None:
        return requested_gib * (1 << 30), "--kv-memory"
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return min(CPU_DEFAULT_BYTES, host_ram_bytes() / 4), "CPU default"
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return CPU_DEFAULT_BYTES, f"{device.device_kind} reports no memory limit; default"
    return pool_bytes(limit, params_bytes(model)), f"{device.device_kind} memory less weights"


def pool_bytes(device_bytes: float, weight_bytes: float, headroom: float = DEVICE_HEADROOM) -> float:
    """What a device of ``device_bytes`` leaves the page pool beside ``weight_bytes`` of weights."""
    return max(0.0, (device_bytes * headroom - weight_bytes) * (1 - ACTIVATION_RESERVE))
