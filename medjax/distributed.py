"""Multi-process start-up: ``jax.distributed.initialize`` driven by the launch environment.

JAX is multi-controller: every host runs the same program, sees all devices of the job
through ``jax.devices()`` and feeds only its local ones. :func:`initialize` must run before
anything touches a device. It decides, in this order:

1. ``MEDJAX_DISTRIBUTED=0`` → stay single-process.
2. Explicit settings (``mesh.coordinator/num_processes/process_id`` in the run config, or the
   env vars ``MEDJAX_COORDINATOR``, ``MEDJAX_NUM_PROCESSES``, ``MEDJAX_PROCESS_ID``,
   ``MEDJAX_LOCAL_DEVICE_IDS``; config wins) → passed straight to JAX. GPU clusters without
   SLURM and ``launch/local_multiprocess.sh`` use this.
3. A known cluster: SLURM with more than one task, a multi-host Cloud TPU VM
   (``TPU_WORKER_HOSTNAMES`` lists several hosts, or ``MEGASCALE_COORDINATOR_ADDRESS`` for
   multi-slice), Open MPI, or ``MEDJAX_DISTRIBUTED=auto`` → ``jax.distributed.initialize()``
   with no arguments; JAX's own cluster detection fills in the rest. With one SLURM task per
   node, every GPU of the node is given to that task (JAX would otherwise take only the
   ``SLURM_LOCALID``-th one).
4. Otherwise: single process, nothing to do.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

import jax

from medjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """What :func:`initialize` will do. ``kind``: ``single`` | ``explicit`` | ``auto``."""

    kind: str
    source: str = ""
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[tuple] = None


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    raw = env.get(key)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {key}={raw!r} must be an integer") from None


def _device_ids(raw: Optional[str]) -> Optional[tuple]:
    if not raw:
        return None
    try:
        return tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"MEDJAX_LOCAL_DEVICE_IDS={raw!r} must be comma-separated integers") from None


def plan_launch(mesh_cfg=None, env: Optional[Mapping[str, str]] = None) -> LaunchPlan:
    """Decide how to start from the config's mesh section and the environment (pure)."""
    env = os.environ if env is None else env
    switch = env.get("MEDJAX_DISTRIBUTED", "").lower()
    if switch in ("0", "off", "false", "no"):
        return LaunchPlan("single", "MEDJAX_DISTRIBUTED=0")
    coordinator = getattr(mesh_cfg, "coordinator", None) or env.get("MEDJAX_COORDINATOR") or None
    num = getattr(mesh_cfg, "num_processes", None) or _int(env, "MEDJAX_NUM_PROCESSES")
    pid = getattr(mesh_cfg, "process_id", None)
    pid = _int(env, "MEDJAX_PROCESS_ID") if pid is None else pid
    local_ids = _device_ids(env.get("MEDJAX_LOCAL_DEVICE_IDS"))
    if coordinator or num is not None or pid is not None:
        missing = [name for name, v in (("coordinator", coordinator), ("num_processes", num),
                                        ("process_id", pid)) if v is None]
        if missing:
            raise ConfigError(f"explicit multi-process launch needs mesh.coordinator, "
                             f"mesh.num_processes and mesh.process_id (or MEDJAX_COORDINATOR, "
                             f"MEDJAX_NUM_PROCESSES, MEDJAX_PROCESS_ID); missing: {missing}")
        if not 0 <= pid < num:
            raise ConfigError(f"process_id {pid} must be in [0, num_processes={num})")
        return LaunchPlan("explicit", "config/env", coordinator, num, pid, local_ids)
    if switch == "auto":
        return LaunchPlan("auto", "MEDJAX_DISTRIBUTED=auto", local_device_ids=local_ids)
    if "SLURM_JOB_ID" in env and (_int(env, "SLURM_NTASKS") or 1) > 1:
        if local_ids is None and env.get("SLURM_NTASKS_PER_NODE") == "1":
            gpus = _int(env, "SLURM_GPUS_ON_NODE")
            local_ids = tuple(range(gpus)) if gpus else None
        return LaunchPlan("auto", "slurm", local_device_ids=local_ids)
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1 \
            or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return LaunchPlan("auto", "tpu")
    if (_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return LaunchPlan("auto", "openmpi", local_device_ids=local_ids)
    return LaunchPlan("single", "no multi-process environment found")


def initialize(mesh_cfg=None, env: Optional[Mapping[str, str]] = None) -> LaunchPlan:
    """Start ``jax.distributed`` if the launch asks for it; a no-op for one process.

    Safe to call twice (the second call does nothing). Returns the plan it followed.
    """
    plan = plan_launch(mesh_cfg, env)
    if plan.kind == "single" or _already_initialized():
        return plan
    kwargs = {}
    if plan.local_device_ids is not None:
        kwargs["local_device_ids"] = list(plan.local_device_ids)
    if plan.kind == "explicit":
        jax.distributed.initialize(plan.coordinator, plan.num_processes, plan.process_id, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)
    return plan


def _already_initialized() -> bool:
    from jax._src import distributed as _dist  # no public query exists in jax 0.10/0.11
    return getattr(_dist.global_state, "client", None) is not None


def is_main_process() -> bool:
    """True on process 0: the one that logs, writes HF exports and prints the summary."""
    return jax.process_index() == 0
