"""Gradient accumulation on 8 simulated devices: strided micro-batches move no batch row between
devices and give the one-batch losses (tests/distributed/accum_split_checks.py, run in a
subprocess so the device-count flag is set before jax is imported)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _checks(marker: str):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
                           "tests/distributed/accum_split_checks.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]        # every selected check ran: none skipped
    assert re.fullmatch(r"\d+ passed, \d+ deselected(, \d+ warnings?)? in .*", summary), proc.stdout[-2000:]


def test_expert_parallel_step_and_dpo_lora_on_eight_devices():
    """fsdp_ep tiny Mixtral: no collective carries a batch row with 2 micro-batches (the
    contiguous split's do); DPO with LoRA: 4 micro-batches = one batch, two steps."""
    _checks("not slow")


@pytest.mark.slow
def test_fsdp_steps_and_every_objective_on_eight_devices():
    """fsdp LoRA / full: the split adds no row collective to the one-micro-batch step (the
    contiguous split adds some); SFT LoRA, CPT full, DPO full: 4 micro-batches = one batch."""
    _checks("slow")
