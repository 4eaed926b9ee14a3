"""``model.scan_layers`` through ``python -m medjax.train``: a full fine-tuning run (with remat)
on stacked layers trains to the same losses as the layer loop (the same weights; LoRA adapters
would be drawn in another order), and a checkpoint of one layout refuses to resume into the
other with a one-line error naming ``model.scan_layers``."""
import json

import numpy as np
import yaml

from train_helpers import tiny_config


def _train(cfg, path, capsys, *extra):
    """``python -m medjax.train --config PATH EXTRA``'s main in this process: (exit status, stderr)."""
    from medjax.cli_errors import run_cli
    from medjax.train.__main__ import main
    path.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
    capsys.readouterr()
    status = run_cli(main, ["--config", str(path), "--no-progress", *extra])
    return status, capsys.readouterr().err


def _losses(run_dir):
    from medjax.train.metrics import read_metrics
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_scan_run_matches_loop_and_other_layout_checkpoint_is_refused(tiny_llama_dir, tiny_alpaca,
                                                                       tmp_path, capsys):
    common = dict(train__steps=4, checkpoint__every=2, model__remat="full")
    runs = {}
    for scan in (False, True):
        cfg = tiny_config(tiny_llama_dir, tiny_alpaca, tmp_path / f"scan{scan}",
                          model__scan_layers=scan, **common)
        status, err = _train(cfg, tmp_path / f"scan{scan}.yaml", capsys)
        assert status == 0, err[-3000:]
        runs[scan] = _losses(tmp_path / f"scan{scan}")
    assert len(runs[True]) == 4
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-5)

    # the loop run's checkpoint resumed by a scan run: exit 2, one line naming the option
    cfg = tiny_config(tiny_llama_dir, tiny_alpaca, tmp_path / "scanFalse", model__scan_layers=True,
                      **dict(common, train__steps=6))
    status, err = _train(cfg, tmp_path / "resume.yaml", capsys, "--resume")
    assert status == 2, err[-3000:]
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "model.scan_layers=false" in error[0], err[-3000:]
