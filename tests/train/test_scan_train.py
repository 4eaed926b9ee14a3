"""``model.scan_layers`` through ``python -m medjax.train``: a full fine-tuning run (with remat)
on stacked layers trains to the same losses as the layer loop (the same weights; LoRA adapters
would be drawn in another order), and a checkpoint of one layout refuses to resume into the
other with a one-line error naming ``model.scan_layers``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from train_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _train(cfg, path, *extra):
    path.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    cmd = [sys.executable, "-m", "medjax.train", "--config", str(path), "--no-progress", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _losses(run_dir):
    from medjax.train.metrics import read_metrics
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_scan_run_matches_loop_and_other_layout_checkpoint_is_refused(tiny_llama_dir, tiny_alpaca,
                                                                       tmp_path):
    common = dict(train__steps=4, checkpoint__every=2, model__remat="full")
    runs = {}
    for scan in (False, True):
        cfg = tiny_config(tiny_llama_dir, tiny_alpaca, tmp_path / f"scan{scan}",
                          model__scan_layers=scan, **common)
        res = _train(cfg, tmp_path / f"scan{scan}.yaml")
        assert res.returncode == 0, res.stderr[-3000:]
        runs[scan] = _losses(tmp_path / f"scan{scan}")
    assert len(runs[True]) == 4
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-5)

    # the loop run's checkpoint resumed by a scan run: exit 2, one line naming the option
    cfg = tiny_config(tiny_llama_dir, tiny_alpaca, tmp_path / "scanFalse", model__scan_layers=True,
                      **dict(common, train__steps=6))
    res = _train(cfg, tmp_path / "resume.yaml", "--resume")
    assert res.returncode == 2, res.stderr[-3000:]
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "model.scan_layers=false" in error[0], res.stderr[-3000:]
