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


def test_local_multiprocess_streams_each_line_when_printed(tmp_path):
    """Each process prints a line, then waits (10 s at most) until the test has seen BOTH lines:
    output that came out only at the end (a block-buffered pipe) would make both time out."""
    go = tmp_path / "go"
    child = ("import os, sys, time; print('ready'); t = time.time()\n"
             f"while not os.path.exists({str(go)!r}) and time.time() - t < 10: time.sleep(0.05)\n"
             f"sys.exit(0 if os.path.exists({str(go)!r}) else 1)")
    proc = subprocess.Popen(["bash", "launch/local_multiprocess.sh", "-n", "2", "--", sys.executable, "-c", child],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
    seen = set()
    for line in proc.stdout:
        seen.add(line.strip())
        if {"[p0] ready", "[p1] ready"} <= seen:
            go.touch()
    assert proc.wait(timeout=60) == 0 and {"[p0] ready", "[p1] ready"} <= seen, seen


def test_local_multiprocess_one_progress_bar_and_no_gloo_chatter():
    child = ("import sys; from tqdm import tqdm\n"
             "print('[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1')\n"
             "for _ in tqdm(range(3), desc='scoring', disable=False, mininterval=0): pass\n"
             "print('done')")
    out = _sh("bash", "launch/local_multiprocess.sh", "-n", "2", "--", sys.executable, "-c", child)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "Gloo" not in text and "[p0] done" in text and "[p1] done" in text, text
    assert "[p0] scoring: 100%" in text and "scoring" not in text.replace("[p0] scoring", ""), text


def test_prefixer_shows_a_growing_bar_and_drops_other_processes_bars():
    import importlib.util
    spec = importlib.util.spec_from_file_location("prefix_output", REPO / "launch" / "prefix_output.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    p0 = mod.Prefixer(b"[p0] ", progress=True)
    assert p0.feed(b"load") == b""                                           # a line: at its end
    assert p0.feed(b"ing\n\rbar 1") == b"[p0] loading\n\r[p0] bar 1"        # a bar: as it grows
    assert p0.feed(b"0%\rbar 50%") == b"0%\r[p0] bar 50%"
    assert p0.feed(b"\rbar 100%\n[Glo") == b"\r[p0] bar 100%\n"             # held: may be gloo's
    assert p0.feed(b"o] Rank 1 is connected to 1 peer ranks\nend") == b""
    assert p0.close() == b"[p0] end"
    p0 = mod.Prefixer(b"[p0] ", progress=True)                               # gloo inside a bar
    out = [p0.feed(c) for c in (b"\rscoring 0%|", b"[Gloo] Rank 0 is connected to 3 peer ranks. "
                                b"Expected number of connected peer ranks is : 3\n", b"\rscoring 10%")]
    assert out == [b"\r[p0] scoring 0%|", b"", b"\r[p0] scoring 10%"]
    p1 = mod.Prefixer(b"[p1] ", progress=False)
    assert p1.feed(b"x\rbar 10%\rbar 100%\nlog\npart") == b"[p1] log\n"
    assert p1.close() == b"[p1] part"
