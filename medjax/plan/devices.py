"""``--device`` and ``--device-memory`` of ``python -m medjax.plan``: names → bytes per device and
device counts, read from THE hardware table (medjax/ops/hardware.py)."""
from __future__ import annotations

import re

from medjax.errors import ConfigError
from medjax.ops.hardware import CHIPS, host_cpu

_ALIASES = {"v5litepod": "v5e"}      # the Cloud TPU name of v5e slices


def parse_memory(text: str) -> float:
    """'80GB' → 80e9, '80GiB' → 80*2**30, '512MiB', '1.5TB'; a bare number is GiB."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--device-memory {text!r}: expected e.g. 80GB or 96GiB")
    value, unit = float(m.group(1)), (m.group(2) or "GiB").upper()
    power = "KMGT".index(unit[0]) + 1
    return value * ((2 ** (10 * power)) if "I" in unit else 10 ** (3 * power))


def parse_device(name: str) -> tuple[str, float, int | None]:
    """'v5p-64' → ('v5p', bytes per device, 32 devices); 'h100' → ('h100', bytes, None);
    'cpu' → this host's RAM as one device (JAX on CPU keeps every array in host memory).
    TPU slice names count TensorCores for v4/v5p (2 per chip = 1 JAX device), chips for v5e/v6e."""
    if name.lower() == "cpu":
        return "cpu", float(host_cpu().hbm_bytes), 1
    names = sorted([*CHIPS, *_ALIASES], key=len, reverse=True)      # a100-40 before a100
    m = re.fullmatch(rf"({'|'.join(map(re.escape, names))})(?:-(\d+))?", name.lower())
    if not m:
        raise ConfigError(f"--device {name!r}: known {sorted(CHIPS)} (TPUs may add a slice "
                          f"size, e.g. v5p-64)")
    kind = _ALIASES.get(m.group(1), m.group(1))
    chip = CHIPS[kind]
    count = None
    if m.group(2):
        if chip.platform != "tpu":
            raise ConfigError(f"--device {name!r}: give GPU counts with --num-devices")
        count = int(m.group(2)) // chip.slice_cores
    return kind, chip.hbm_bytes, count
