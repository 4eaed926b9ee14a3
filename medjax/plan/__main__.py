"""``python -m medjax.plan``: per-device memory of a training run, from shapes alone.

    python -m medjax.plan --config FILE [key=value ...] [--device h100|h200|a100|v5p|v5e|v4|v6e[-N]]
                          [--device-memory 80GB] [--num-devices N] [--compile]
    python -m medjax.plan --serve

``--compile`` asks the real TPU / GPU compiler instead (medjax/plan/compile.py). What is counted:
medjax/plan/accounting.py; ``--device-memory`` accepts GB (1e9) or GiB.
"""
from __future__ import annotations

import argparse
import sys

from medjax.config import load_config
from medjax.errors import ConfigError
from medjax.ops.hardware import CHIPS
from medjax.plan.accounting import model_config, plan
from medjax.plan.devices import parse_device, parse_memory
from medjax.plan.report import report


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options (a function, so other planners can add theirs, e.g. ``--compile``)."""
    ap = argparse.ArgumentParser(prog="python -m medjax.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append",
                    help="run config YAML (model, mesh, train, data, lora, optim); repeat to overlay")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.preset=fsdp")
    ap.add_argument("--device", help=f"{' | '.join(CHIPS)} | cpu (host RAM); TPU slices may add their size "
                                     "(v5p-64 = 32 chips); chips: medjax/ops/hardware.py")
    ap.add_argument("--device-memory", help="memory per device, e.g. 80GB or 96GiB (overrides --device)")
    ap.add_argument("--num-devices", type=int, help="devices in the mesh (default: from --device "
                                                    "slice size, else the devices the config's mesh "
                                                    "asks for: the product of its fixed axis sizes)")
    ap.add_argument("--serve", action="store_true",
                    help="print the KV pages python -m medjax.serve fits beside Llama-3-8B on one "
                         "H100 and on one v5e chip (no config needed)")
    ap.add_argument("--compile", action="store_true",
                    help="also compile the real train step for --device (compile-only TPU/GPU, "
                         "needs the tpu/cuda extra; see medjax/plan/compile.py)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:      # the serving planner's lines (medjax/serve/plan.py)
        from medjax.plan.report import HEADROOM
        from medjax.serve.plan import kv_pages_report
        print(kv_pages_report({d: parse_device(d)[1] for d in ("h100", "v5e")}, HEADROOM))
        return 0
    if args.compile:
        return _compile(args)
    cfg = load_config(args.config, args.overrides)                 # ConfigError: one line, exit 2
    name, device_bytes, count = parse_device(args.device) if args.device else (None, None, None)
    if args.device_memory:
        device_bytes = parse_memory(args.device_memory)
    p = plan(cfg, args.num_devices or count, host_cpu=name == "cpu")
    print(report(cfg, p, args.device and args.device.lower(), device_bytes))
    return 1 if device_bytes and max(p.total, p.load_peak) > device_bytes else 0


def _compile(args) -> int:
    """``--compile``: medjax.plan.compile asks libtpu / XLA:GPU about the real train step."""
    from medjax.plan import compile as plan_compile
    if not args.device:
        raise ConfigError("--compile needs --device (e.g. v5p-64, or h100 --num-devices 8)")
    cfg = load_config(args.config, args.overrides)
    memory = parse_memory(args.device_memory) if args.device_memory else None
    kind, _, slice_count = parse_device(args.device)
    return plan_compile.run(cfg, kind, args.num_devices or slice_count or 1, memory,
                            model_cfg=model_config(cfg), estimate_fn=lambda n: plan(cfg, n))


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
