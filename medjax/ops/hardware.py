"""THE hardware table: one row per accelerator medjax plans for, compiles for or benchmarks on.

Read by the memory planner (``medjax.plan``: HBM per device, TPU slice names), the compile-only
planner (``plan --compile``: topologies, the GPU target config, peak FLOPs), the Pallas TPU
compile checks (``ops/pallas/tpu_compile.py``: the Mosaic chip version and a small topology) and
the GPU benchmarks (MFU against the bf16 peak). It lives in ``medjax.ops``, which imports nothing
of medjax, so the kernels' compile tooling and the planner read the same numbers (add a chip:
one row here). Numbers per JAX device: one chip (v4/v5p megacore: two TensorCores per chip).
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2 ** 30


@dataclass(frozen=True)
class Chip:
    name: str               # the device_kind JAX reports ("NVIDIA H100 80GB HBM3", "TPU v5p")
    platform: str           # "tpu" | "cuda" | "cpu"
    hbm_bytes: int          # memory per JAX device
    bf16_flops: float       # dense bf16 peak per JAX device
    hbm_bandwidth: float    # bytes/s per JAX device
    topology_prefix: str    # topologies.get_topology_desc name prefix / GPU topology name
    dims: int = 0           # TPU torus dimensions (2 or 3); 0 for GPUs
    slice_cores: int = 1    # what a TPU slice name (v5p-64) counts per JAX device: 2 TensorCores on v4/v5p
    tpu_version: str = ""   # jax's tpu_info.ChipVersion member (Mosaic's target), TPUs only
    small_topology: str = ""   # the topology the Pallas compile checks use, TPUs only
    compile_only: bool = True  # ``plan --compile`` can target it (the GPU target config is Hopper's)


# Public spec sheets. GPU memory: the device_memory_size of XLA's own target configs
# (H100 80GB HBM3: 84_942_979_072 bytes = 79.1 GiB; H200: 140.4 GiB), A100: 80 / 40 GiB.
CHIPS = {
    "v4": Chip("TPU v4", "tpu", 32 * GiB, 275e12, 1.2e12, "v4", 3, 2, "TPU_V4", "v4:2x2x1"),
    "v5e": Chip("TPU v5e", "tpu", 16 * GiB, 197e12, 0.82e12, "v5e", 2, 1, "TPU_V5E", "v5e:2x2"),
    "v5p": Chip("TPU v5p", "tpu", 95 * GiB, 459e12, 2.76e12, "v5p", 3, 2, "TPU_V5P", "v5p:2x2x1"),
    "v6e": Chip("TPU v6e", "tpu", 32 * GiB, 918e12, 1.64e12, "v6e", 2, 1, "TPU_V6E", "v6e:2x2"),
    "h100": Chip("NVIDIA H100 80GB HBM3", "cuda", 84_942_979_072, 989e12, 3.35232e12, "h100"),
    "h200": Chip("NVIDIA H200", "cuda", 150_754_820_096, 989e12, 4.8e12, "h200"),
    "a100": Chip("NVIDIA A100-SXM4-80GB", "cuda", 80 * GiB, 312e12, 2.039e12, "a100", compile_only=False),
    "a100-40": Chip("NVIDIA A100-SXM4-40GB", "cuda", 40 * GiB, 312e12, 1.555e12, "a100",
                    compile_only=False),
}


def chip_of(device_kind: str) -> Chip | None:
    """The ``CHIPS`` entry of a live device's ``device_kind`` ("NVIDIA H100 80GB HBM3",
    "NVIDIA H200", "TPU v5p", ...), or None for chips not in the table (CPU, other GPUs)."""
    kind = device_kind.upper()
    for chip in CHIPS.values():
        if chip.name.upper() == kind:
            return chip
    for key, chip in CHIPS.items():      # a GPU by its family name ("NVIDIA H100 PCIe")
        if chip.platform == "cuda" and key.upper() in kind:
            return chip
    return None


def tpu_chips() -> list[str]:
    """The TPU rows' names (v4, v5e, v5p, v6e)."""
    return [k for k, c in CHIPS.items() if c.platform == "tpu"]


def host_cpu() -> Chip:
    """This host as a device: its RAM (JAX on CPU keeps every array in host memory). No peak
    FLOPs: XLA:CPU's reach depends on the host (../shared/FACTS.md measures this machine's)."""
    import os
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Chip("host CPU", "cpu", ram, 0.0, 0.0, "cpu", compile_only=False)
