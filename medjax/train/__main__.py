"""``python -m medjax.train [--config FILE] [key=value ...] [--resume]``: fine-tune a model.

Without ``--config`` it runs ``configs/demo.yaml`` (LoRA on SmolLM2-135M-Instruct with the
bundled medical instruction set). Every config key can be overridden on the command line,
e.g. ``train.steps=20 lora.rank=16 optim.lr=1e-4``; the keys are listed below (``--help``) and
documented, with defaults, in medjax/config.py. ``train.steps=N`` on the command line wins over a
recipe's ``train.epochs``. See docs/TRAINING.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def config_keys_help() -> str:
    """Every ``section.key`` a run config accepts, read from the config dataclasses."""
    import dataclasses
    import textwrap
    import typing

    from medjax.config import RunConfig
    lines = ["config keys (key=value; meanings and defaults: medjax/config.py, guide: docs/TRAINING.md):"]
    for name, section in typing.get_type_hints(RunConfig).items():
        keys = ", ".join(f.name for f in dataclasses.fields(section))
        lines += textwrap.wrap(f"{name}: {keys}", 100, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m medjax.train", description=__doc__, epilog=config_keys_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, action="append",
                   help=f"run config YAML (default: {DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[1])}); "
                        f"repeat to overlay files, later ones win, e.g. --config configs/tiny/llama2.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.steps=20 lora.rank=16")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest readable checkpoint in the run's checkpoint dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from medjax.config import load_config   # understands `model=tiny` (the family overlay)
    from medjax.run import run
    from medjax.train.loop import TrainingDiverged, TrainingInterrupted
    cfg = load_config(args.config or [DEMO_CONFIG], args.overrides, check_inputs=True)   # ConfigError: exit 2
    from medjax.distributed import initialize
    initialize(cfg.mesh)   # multi-host: jax.distributed from the launch environment; no-op alone
    try:
        summary = run(cfg, resume=args.resume, show_bar=not args.no_progress)
    except TrainingDiverged as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:  # preemption: checkpoint written, exit 128 + signal number
        print(f"training interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    print(_format_summary(summary))
    return 0


def _format_summary(s: dict) -> str:
    lines = ["", "== training summary =="]
    before, after = s.get("heldout_loss_before"), s.get("heldout_loss_after")
    if after is not None:
        lines.append(f"held-out loss: {before:.4f} -> {after:.4f}" if before is not None
                     else f"held-out loss: {after:.4f}")
    for key in ("steps", "trainable_params", "final_train_loss", "loss_tokens_per_s",
                "train_seconds", "total_seconds", "plot"):
        if s.get(key) is not None:
            lines.append(f"{key}: {s[key]}")
    before = (s.get("eval_before") or {}).get("results") or {}
    for task, row in ((s.get("eval") or {}).get("results") or {}).items():
        was = f"{before[task]['acc']:.3f} -> " if task in before else ""
        lines.append(f"{task} acc ({row['n']} items): {was}{row['acc']:.3f}")
    for kind, path in (s.get("exports") or {}).items():
        lines.append(f"export {kind}: {path}")
    lines.append(json.dumps({k: s[k] for k in ("heldout_loss_before", "heldout_loss_after") if k in s}))
    return "\n".join(lines)


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
