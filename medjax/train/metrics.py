"""What the user sees: a tqdm bar, ``metrics.jsonl``, TensorBoard events, and a final loss/LR plot."""
from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from medjax.data.jsonl import read_jsonl
from medjax.outputs import write_file


class MetricsLogger:
    """One line per logged step to ``<run_dir>/metrics.jsonl`` (appended on resume) and TensorBoard.
    ``writer=False`` (every process but the main one of a multi-process run) writes nothing."""

    def __init__(self, run_dir, *, total_steps: int, start_step: int = 0, show_bar: bool = True,
                 writer: bool = True):
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._jsonl = self._tb = None
        if writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # the GPU image may lack tensorboardX
                self._tb = None
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                         dynamic_ncols=True, disable=not (show_bar and writer))
        self._t_last = time.perf_counter()
        self._tokens_since = 0.0

    def log(self, step: int, metrics: dict, *, kind: str = "train") -> None:
        record = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def step(self, step: int, metrics: dict, tokens: float) -> dict:
        """Advance the bar; returns metrics with ``tokens_per_s`` added."""
        now = time.perf_counter()
        dt = max(now - self._t_last, 1e-9)
        self._t_last = now
        metrics = dict(metrics, tokens_per_s=tokens / dt, step_time_s=dt)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                              tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        return metrics

    def write(self, text: str) -> None:
        if self._jsonl is not None:
            self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return v
    return v if math.isfinite(v) else str(v)


def read_metrics(path) -> list[dict]:
    """Records of ``metrics.jsonl``; for repeated (step, kind) the LAST one wins (resumed runs)."""
    latest = {(r["kind"], r["step"]): r for r in read_jsonl(path)}
    return sorted(latest.values(), key=lambda r: (r["kind"], r["step"]))


def plot_run(metrics_path, out_png) -> Path:
    """Training loss (+ held-out loss) and learning rate against step, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval" and isinstance(r.get("loss"), float)]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] if isinstance(r["loss"], float) else math.nan
                                              for r in train], label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out loss")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return write_file(out_png, png.getvalue())
