"""``python -m medjax.bench compile``: compile time of one train step against the layer count,
layers scanned (``model.scan_layers=true``) vs a Python loop over them.

The step is the trainer's own (``plan_compile.abstract_step``: ``training.setup.build_trainable``
on a shape-only model, the run's shardings), lowered and compiled for this machine's first
device; nothing is allocated. The model is a narrow Llama (``--preset``, default ``tiny-llama2``:
hidden 64) with its depth set to each ``--layers`` value, so the time measured is the
compiler's work on the program's size, not on wide matmuls. Each (layout, depth) is measured
in a fresh process (no cache shared between runs): building the shape-only model, then the
step's trace + lower and its XLA compile, in seconds; "step" = lower + compile.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(layers: int, scan: bool, *, preset: str, lora: bool, seq: int, batch: int,
            remat: str) -> dict:
    """``{"build_s", "lower_s", "compile_s"}`` of one train step in this process: building the
    shape-only model and trainable split, tracing + lowering the step, XLA compile."""
    import jax

    from medjax import sharding
    from medjax.config import load_config
    from medjax.models import get_preset
    from medjax.plan.compile import abstract_step
    overrides = [f"model.preset={preset}", f"model.scan_layers={str(scan).lower()}",
                 f"model.remat={remat}", f"data.seq_len={seq}", f"train.batch_size={batch}",
                 "mesh.preset=dp", "model.attention=xla"]
    if lora:
        overrides.append("lora.enabled=true")
    cfg = load_config(None, overrides)
    model_cfg = get_preset(preset).replace(num_layers=layers)
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    t0 = time.perf_counter()
    step, args = abstract_step(cfg, mesh, model_cfg)
    t1 = time.perf_counter()
    lowered = step.lower(*args)
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return {"build_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.bench compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="4,8,16,32", help="comma-separated layer counts")
    p.add_argument("--layouts", default="scan,loop", help="scan and/or loop")
    p.add_argument("--preset", default="tiny-llama2")
    p.add_argument("--full", action="store_true", help="full fine-tuning (default: LoRA)")
    p.add_argument("--remat", default="full", help="model.remat (default: full)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1,
                   help="fresh processes per cell; each column keeps its minimum (a shared, "
                        "loaded machine only ever adds time)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)        # internal: LAYERS,LAYOUT in this process
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    kw = dict(preset=args.preset, lora=not args.full, seq=args.seq, batch=args.batch,
              remat=args.remat)
    if args.one:
        layers, layout = args.one.split(",")
        print(json.dumps(measure(int(layers), layout == "scan", **kw)))
        return 0
    import jax
    layouts = args.layouts.split(",")
    depths = [int(x) for x in args.layers.split(",")]
    print(f"compile time of one {'full' if args.full else 'LoRA'} train step, {args.preset} "
          f"(depth varied), remat {args.remat}, batch {args.batch} x seq {args.seq}, "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{'layers':>6} " + " ".join(f"{lay + ' build':>11} {lay + ' lower':>11} "
                                       f"{lay + ' compile':>13} {lay + ' step':>10}" for lay in layouts))
    rows = []
    passthrough = [f"--preset={args.preset}", f"--remat={args.remat}", f"--seq={args.seq}",
                   f"--batch={args.batch}"] + (["--full"] if args.full else [])
    for L in depths:
        row = {"layers": L}
        for lay in layouts:
            runs = []
            for _ in range(max(1, args.repeat)):
                out = subprocess.run([sys.executable, "-m", "medjax.bench", "compile",
                                      f"--one={L},{lay}", *passthrough],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row[lay] = {k: min(r[k] for r in runs) for k in runs[0]}
        rows.append(row)
        print(f"{L:>6} " + " ".join(
            f"{row[lay]['build_s']:>11.2f} {row[lay]['lower_s']:>11.2f} {row[lay]['compile_s']:>13.2f} "
            f"{row[lay]['lower_s'] + row[lay]['compile_s']:>10.2f}" for lay in layouts), flush=True)
    for lay in layouts:
        total = [r[lay]["lower_s"] + r[lay]["compile_s"] for r in rows]
        print(f"{lay}: step (lower + compile) at {depths[-1]} layers / at {depths[0]} layers = "
              f"{total[-1] / total[0]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
