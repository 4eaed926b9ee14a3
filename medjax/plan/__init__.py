"""The memory planner: what a training run needs per device, before any device is touched.

``accounting`` (the bytes of a run: :func:`plan` → :class:`Plan`), ``devices`` (``--device``
names → bytes and counts, from medjax/ops/hardware.py), ``report`` (the printed table),
``compile`` (``--compile``: the real train step compiled for compile-only TPUs / GPUs) and
``__main__`` (``python -m medjax.plan``). The names below are the library's face.
"""
from medjax.plan.accounting import Plan, activation_bytes, mesh_devices, model_config, plan
from medjax.plan.devices import parse_device, parse_memory
from medjax.plan.report import report

__all__ = ["Plan", "activation_bytes", "mesh_devices", "model_config", "plan", "parse_device",
           "parse_memory", "report"]
