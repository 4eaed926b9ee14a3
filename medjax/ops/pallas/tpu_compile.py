"""Compile Pallas kernels for a TPU on a CPU-only machine (the real Mosaic compiler, no TPU).

``jax.experimental.topologies.get_topology_desc`` gives compile-only TPU devices once libtpu is
installed; ``jax.jit(f).lower(...).compile()`` on them runs XLA:TPU and Mosaic, which check VMEM,
tiling and layouts (lowering alone does not). Two things make that safe and possible here:

* libtpu must never reach for a cloud metadata server: the process needs
  ``TPU_SKIP_MDS_QUERY=1`` and ``JAX_PLATFORMS=cpu`` before jax starts a backend.
  ``require_compile_only_env()`` refuses to run otherwise; ``compile_only_env()`` is the
  environment to start such a process with. libtpu lives in ``.venv-tpu`` (``make tpu-venv``),
  never in the main venv.
* Pallas asks the *default* device (the CPU here) which TPU it targets. ``target_chip(name)``
  answers for the chip being compiled for, in the one place Mosaic asks (``tpu_info``).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path

from medjax.ops.hardware import CHIPS as _HARDWARE, tpu_chips

# the TPU rows of medjax/ops/hardware.py (small topology, Mosaic chip version): the chips here
CHIPS = {name: _HARDWARE[name] for name in tpu_chips()}
REPO_ROOT = Path(__file__).resolve().parents[3]
TPU_VENV_PYTHON = REPO_ROOT / ".venv-tpu" / "bin" / "python"


# What libtpu would otherwise ask a cloud metadata server about THIS host. Without them every
# compile-only run printed "WARNING: could not determine TPU accelerator type", "E0000 ...
# INVALID_ARGUMENT: unexpected worker hostname ..." and a source trace. They describe the (absent)
# local host, not the compile target, which comes from the topology name: with any valid accelerator
# type the same v6e:2x2 compile succeeds silently (libtpu 0.0.42.1: v5p-8, v6e-4, v5e-4, v4-8).
# ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise takes a machine-wide lock (/tmp/libtpu_lockfile) and
# a second compile-only process on the same machine fails at start.
LIBTPU_HOST_ENV = {"TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_ID": "0",
                   "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def compile_only_env(base=None) -> dict:
    """Environment for a process that loads libtpu only to compile (see module docstring)."""
    env = {**LIBTPU_HOST_ENV, **dict(os.environ if base is None else base)}
    env.update(TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    return env


def use_compile_only_libtpu() -> None:
    """Tell libtpu, in this process and before it loads, that it only compiles: no metadata
    server, and the host facts it would otherwise warn about (``LIBTPU_HOST_ENV``)."""
    os.environ["TPU_SKIP_MDS_QUERY"] = "1"
    for key, value in LIBTPU_HOST_ENV.items():
        os.environ.setdefault(key, value)


def topology_devices(topology_name: str):
    """Compile-only TPU devices of ``topology_name`` (e.g. ``v5p:2x2x1``): the one place medjax
    creates them, so libtpu always starts with the environment above."""
    use_compile_only_libtpu()
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices


def libtpu_python() -> Path | None:
    """A Python that has libtpu: this one, else the repo's ``.venv-tpu``; None if neither."""
    import importlib.util
    if importlib.util.find_spec("libtpu") is not None:
        return Path(sys.executable)
    return TPU_VENV_PYTHON if TPU_VENV_PYTHON.exists() else None


def require_compile_only_env():
    bad = [k for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("JAX_PLATFORMS", "cpu"))
           if os.environ.get(k) != v]
    if bad:
        raise RuntimeError(f"TPU compile-only needs {', '.join(bad)} set before jax starts "
                           "(libtpu must not query a metadata server); use compile_only_env()")


def tpu_devices(chip: str):
    """Compile-only devices of a small topology of ``chip`` (one of ``CHIPS``)."""
    require_compile_only_env()
    return topology_devices(CHIPS[chip].small_topology)


def _tpu_info_modules() -> list:
    """Every module whose ``get_tpu_info`` lowering reads: ``jax._src.pallas.mosaic.tpu_info``
    (jax 0.10.2-0.11.0) and, after 0.11.0, ``jax._src.tpu_info``, which the former re-exports
    and ``lax`` reads directly."""
    import importlib
    modules = [importlib.import_module("jax._src.pallas.mosaic.tpu_info")]
    try:
        modules.append(importlib.import_module("jax._src.tpu_info"))
    except ImportError:      # jax <= 0.11.0
        pass
    return modules


@contextlib.contextmanager
def target_chip(chip: str):
    """While active, Pallas/Mosaic lowering targets ``chip`` instead of asking the CPU device."""
    modules = _tpu_info_modules()
    tpu_info = modules[0]
    info = tpu_info.get_tpu_info_for_chip(getattr(tpu_info.ChipVersion, CHIPS[chip].tpu_version), 1)
    answer = lambda *a, **k: info
    saved = [m.get_tpu_info for m in modules]
    for m in modules:
        m.get_tpu_info = answer
    try:
        yield info
    finally:
        for m, original in zip(modules, saved):
            m.get_tpu_info = original


_KERNEL_NAME = re.compile(r'([A-Za-z_]\w*)\)*/pallas_call"')
_SCOPED = re.compile(r'"used_scoped_memory_configs":\[([^\]]*)\]')
_SIZE = re.compile(r'"size":"(\d+)"')
_VMEM_OOM = re.compile(r"Scoped allocation with size (\S+) and limit (\S+) exceeded"
                       r"|Used (\S+) of (\S+) vmem")


def mosaic_kernels(hlo_text: str) -> dict:
    """``{kernel name: scoped VMEM bytes}`` of the Mosaic custom calls in compiled HLO text, as
    the compiler allotted it (``used_scoped_memory_configs``); the max over repeated calls."""
    kernels = {}
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        name = _KERNEL_NAME.search(line)
        scoped = _SCOPED.search(line)
        size = sum(int(n) for n in _SIZE.findall(scoped.group(1))) if scoped else 0
        key = name.group(1) if name else "?"
        kernels[key] = max(kernels.get(key, 0), size)
    return kernels


def compile_for_tpu(fn, arg_shapes, chip: str) -> dict:
    """Compile ``jit(fn)`` for ``chip`` on ShapeDtypeStructs; return what the compiler reports.

    Keys: ``compile_s``, ``tpu_custom_calls`` (Mosaic calls in the compiled HLO), ``vmem_mib``
    (``{kernel: scoped VMEM MiB}``, ``mosaic_kernels``), ``flops`` (cost analysis),
    ``hbm_temp_mib``, ``hbm_args_mib``; or ``error`` (one line) and ``compile_s``.
    """
    import jax
    from jax.sharding import SingleDeviceSharding
    device = tpu_devices(chip)[0]
    shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=SingleDeviceSharding(device))
              for s in arg_shapes]
    start = time.perf_counter()
    try:
        with target_chip(chip):
            compiled = jax.jit(fn).lower(*shapes).compile()
    except Exception as e:  # the compiler's verdict (VMEM OOM, layout, ...) is the result
        text = str(e)
        oom, kernel = _VMEM_OOM.search(text), _KERNEL_NAME.search(text)
        if oom:
            used, limit = oom.group(1) or oom.group(3), oom.group(2) or oom.group(4)
            line = (f"VMEM overflow in {kernel.group(1) if kernel else '?'}: "
                    f"{used} needed, limit {limit}")
        else:
            line = text.strip().splitlines()[0] if text.strip() else ""
        return dict(error=f"{type(e).__name__}: {line[:200]}",
                    compile_s=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    mem = compiled.memory_analysis()
    return dict(compile_s=seconds, tpu_custom_calls=hlo.count('"tpu_custom_call"'),
                vmem_mib={k: v / 2**20 for k, v in mosaic_kernels(hlo).items()},
                flops=float(cost.get("flops", 0.0)),
                hbm_temp_mib=None if mem is None else mem.temp_size_in_bytes / 2**20,
                hbm_args_mib=None if mem is None else mem.argument_size_in_bytes / 2**20)
