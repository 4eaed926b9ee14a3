"""SIGKILL mid-run, then --resume: the loss sequence equals an uninterrupted run's, bit for bit."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _write_yaml(cfg, path):
    d = cfg.to_dict()
    path.write_text(yaml.safe_dump(json.loads(json.dumps(d))))
    return path


def _losses(run_dir):
    from medjax.train.metrics import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def _train(config, *extra, wait=True):
    cmd = [sys.executable, "-m", "medjax.train", "--config", str(config), "--no-progress", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return (subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600) if wait
            else subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tiny_llama_dir, tiny_alpaca, tmp_path):
    steps = 40
    common = dict(train__steps=steps, checkpoint__every=5, checkpoint__async_save=True,
                  lora__enabled=True, lora__rank=4, lora__dropout=0.1, optim__schedule="cosine",
                  optim__warmup_steps=3)
    ref_cfg = _write_yaml(tiny_config(tiny_llama_dir, tiny_alpaca, tmp_path / "ref", **common),
                          tmp_path / "ref.yaml")
    cut_cfg = _write_yaml(tiny_config(tiny_llama_dir, tiny_alpaca, tmp_path / "cut", **common),
                          tmp_path / "cut.yaml")
    ref = _train(ref_cfg)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = _train(cut_cfg, wait=False)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(_losses(tmp_path / "cut")) >= 17:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "summary.json").exists()
    killed_at = max(_losses(tmp_path / "cut"))
    assert killed_at < steps

    resumed = _train(cut_cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert 0 < summary["start_step"] <= killed_at
    ref_losses, cut_losses = _losses(tmp_path / "ref"), _losses(tmp_path / "cut")
    assert sorted(cut_losses) == list(range(1, steps + 1))
    assert [cut_losses[s] for s in range(1, steps + 1)] == [ref_losses[s] for s in range(1, steps + 1)]
