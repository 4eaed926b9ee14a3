"""The product path in 2 processes equals 1 process: ``launch/local_multiprocess.sh -n 2 -d 4 --
python -m medjax.train ...`` against ``python -m medjax.train`` on 8 simulated devices.

``data.pack=false`` and ``data.long_examples=truncate``: packing (and splitting a long example
into several rows) runs per host over that host's examples, so those rows would differ from a
1-process run's; one row per example, each host's rows are the 1-process batch's rows split by
process (``make_dataset`` takes every ``process_count``-th example), so the batch — and the
loss, up to summation order — is the same. ``lora.dropout=0``: dropout masks are drawn by
position in the GLOBAL batch, and the processes' rows sit there in another order (host 0 holds
examples 0, 2, 4, ... of a batch, host 1 examples 1, 3, 5, ...), so with dropout each example
would get another mask than in the 1-process run.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _train(out_dir, *extra, processes=1, resume=False):
    args = [sys.executable, "-m", "medjax.train", "--no-progress", *(["--resume"] if resume else []),
            "--config", str(ROOT / "configs" / "melt_llama2_lora.yaml"), "model=tiny", "mesh.preset=fsdp",
            "data.pack=false", "data.long_examples=truncate", "lora.dropout=0", "train.steps=4", "train.export=[]", "eval.tasks=[]", "checkpoint.every=2",
            f"train.out_dir={out_dir}", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    if processes == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        cmd = args
    else:
        env.pop("XLA_FLAGS", None)
        cmd = [str(ROOT / "launch" / "local_multiprocess.sh"), "-n", str(processes), "-d", "4", "--", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _losses(run_dir):
    from medjax.training.metrics import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"}


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    one = _train(tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(tmp_path / "two", processes=2)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-5 * max(1.0, abs(ref[s])), (s, ref[s], got[s])


@pytest.mark.slow
def test_two_processes_resume_identically(tmp_path):
    """Both processes stopped after the step-2 checkpoint (what comes later removed), then
    ``--resume`` in both: every host restores its own iterator position and the steps repeat."""
    import shutil
    first = _train(tmp_path / "two", processes=2)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    got = _losses(tmp_path / "two")
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "4")
    resumed = _train(tmp_path / "two", processes=2, resume=True)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    again = _losses(tmp_path / "two")
    assert [again[s] for s in (3, 4)] == [got[s] for s in (3, 4)]


@pytest.mark.slow
def test_a_batch_the_mesh_cannot_split_stops_every_process_with_one_error(tmp_path):
    bad = _train(tmp_path / "bad", "train.batch_size=12", "train.grad_accum=1", processes=2)
    assert bad.returncode == 2, (bad.stdout + bad.stderr)[-3000:]
    errors = [line for line in (bad.stdout + bad.stderr).splitlines() if "error:" in line]
    assert errors and all("batch size 12" in line for line in errors), errors
