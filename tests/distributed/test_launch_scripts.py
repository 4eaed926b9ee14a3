"""launch/ scripts: the TPU pod dry run prints the full gcloud sequence; the local launcher
sets the jax.distributed environment per process and propagates failures."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _sh(*cmd, env=None, timeout=60):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_tpu_pod_dry_run_prints_complete_sequence():
    out = _sh("bash", "launch/tpu_pod.sh", "--dry-run", "all", "--", "--config", "c.yaml",
              "mesh.preset=fsdp", env={"ACCELERATOR_TYPE": "v5p-64", "PROJECT": "p1", "SPOT": "1"})
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    verbs = [tuple(words[:5]) for words in lines]
    assert verbs == [("gcloud", "compute", "tpus", "tpu-vm", "create"),
                     ("git", "-C", str(REPO), "archive", "--format=tar.gz"),
                     ("gcloud", "compute", "tpus", "tpu-vm", "scp"),
                     ("gcloud", "compute", "tpus", "tpu-vm", "ssh"),
                     ("gcloud", "compute", "tpus", "tpu-vm", "ssh"),
                     ("gcloud", "compute", "tpus", "tpu-vm", "delete")]
    create = lines[0]
    for flag in ("--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--zone=us-east5-a",
                 "--project=p1", "--spot"):
        assert flag in create
    for words in lines[2:5]:
        assert "--worker=all" in words and "--project=p1" in words
    run_cmd = lines[4][lines[4].index("--command") + 1]
    assert run_cmd.endswith("python -m medjax.train --config c.yaml mesh.preset=fsdp")
    assert "MEDJAX_DISTRIBUTED=auto" in run_cmd
    assert "pip install" in lines[3][lines[3].index("--command") + 1]
    assert _sh("bash", "launch/tpu_pod.sh").returncode == 2
    lite = _sh("bash", "launch/tpu_pod.sh", "--dry-run", "create",
               env={"ACCELERATOR_TYPE": "v5litepod-16"}).stdout
    assert "--version=v2-alpha-tpuv5-lite" in lite


def test_local_multiprocess_env_and_failure_status():
    probe = ("import os, sys; e = os.environ; print(e['MEDJAX_PROCESS_ID'], e['MEDJAX_NUM_PROCESSES'],"
             " e['MEDJAX_COORDINATOR'].startswith('127.0.0.1:'), e['XLA_FLAGS'].split()[-1]);"
             " sys.exit(3 if e['MEDJAX_PROCESS_ID'] == '2' else 0)")
    out = _sh("bash", "launch/local_multiprocess.sh", "-n", "3", "-d", "2", "--",
              sys.executable, "-c", probe)
    assert out.returncode == 3, out.stdout + out.stderr
    lines = sorted(out.stdout.strip().splitlines())
    assert lines == [f"[p{i}] {i} 3 True --xla_force_host_platform_device_count=2" for i in range(3)]
    ok = _sh("bash", "launch/local_multiprocess.sh", "-n", "2", "--", sys.executable, "-c", "pass")
    assert ok.returncode == 0
