"""``python -m medjax.bench compile``: compile time of one train step against the layer count,
layers scanned (``model.scan_layers=true``) vs a Python loop over them.

The step is the trainer's own (``plan_compile.abstract_step``: ``training.setup.build_trainable``
on a shape-only model, the run's shardings), lowered and compiled for this machine's first
device; nothing is allocated. The run is ``--config`` with ``key=value`` overrides (as for
``python -m medjax.train``: ``--config configs/melt_mixtral_lora.yaml model=tiny``), by default a
narrow Llama (``tiny-llama2``: hidden 64, LoRA), with its depth set to each ``--layers`` value, so
the time measured is the compiler's work on the program's size, not on wide matmuls. Each (layout, depth) is measured
in a fresh process (no cache shared between runs): building the shape-only model, then the
step's trace + lower and its XLA compile, in seconds; "step" = lower + compile.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from medjax.config import load_config
from medjax.errors import ConfigError
from medjax.outputs import write_file


# Without --config: a narrow LoRA Llama (hidden 64), so the time measured is the compiler's work
# on the program's size, not on wide matmuls.
DEFAULT_RUN = ("model.preset=tiny-llama2", "model.remat=full", "data.seq_len=128",
               "train.batch_size=2", "lora.enabled=true")


def run_config(config=None, overrides=(), *, scan: bool = True, preset=None, remat=None, seq=None,
               batch=None, full: bool = False):
    """The run whose train step is measured: ``--config`` file(s) and ``key=value`` overrides
    through the one loader (``model=tiny`` included), else :data:`DEFAULT_RUN`; the flags given
    win; then the layout measured, one device (``dp``) and XLA attention."""
    flags = [f"model.preset={preset}" if preset else None, f"model.remat={remat}" if remat else None,
             f"data.seq_len={seq}" if seq else None, f"train.batch_size={batch}" if batch else None]
    flags += ["lora.enabled=false", "lora.quantize=null"] if full else []
    fixed = [f"model.scan_layers={str(scan).lower()}", "model.attention=xla", "mesh.preset=dp",
             "mesh.data=null", "mesh.fsdp=null", "mesh.tensor=null", "mesh.expert=null"]
    cfg = load_config(config, [*(() if config else DEFAULT_RUN), *overrides, *filter(None, flags), *fixed])
    if cfg.model.preset is None:
        raise ConfigError("bench compile varies a preset's depth: the config needs model.preset")
    return cfg


def measure(layers: int, cfg) -> dict:
    """``{"build_s", "lower_s", "compile_s"}`` of one train step of ``cfg`` with ``layers`` layers
    in this process: building the shape-only model and trainable split, tracing + lowering the
    step, XLA compile."""
    import jax

    from medjax import sharding
    from medjax.models import get_preset
    from medjax.plan.compile import abstract_step
    model_cfg = get_preset(cfg.model.preset).replace(num_layers=layers)
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
    p.add_argument("--config", action="append",
                   help="run config YAML (repeat to overlay); default: a LoRA tiny-llama2 step")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. model=tiny lora.rank=16")
    p.add_argument("--preset", help="model.preset (default: tiny-llama2, or the config's)")
    p.add_argument("--full", action="store_true", help="full fine-tuning (default: LoRA, or the config's)")
    p.add_argument("--remat", help="model.remat (default: full, or the config's)")
    p.add_argument("--seq", type=int, help="data.seq_len (default: 128, or the config's)")
    p.add_argument("--batch", type=int, help="train.batch_size (default: 2, or the config's)")
    p.add_argument("--repeat", type=int, default=1,
                   help="fresh processes per cell; each column keeps its minimum (a shared, "
                        "loaded machine only ever adds time)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)        # internal: LAYERS,LAYOUT in this process
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    knobs = dict(preset=args.preset, remat=args.remat, seq=args.seq, batch=args.batch, full=args.full)
    if args.one:
        layers, layout = args.one.split(",")
        cfg = run_config(args.config, args.overrides, scan=layout == "scan", **knobs)
        print(json.dumps(measure(int(layers), cfg)))
        return 0
    import jax
    cfg = run_config(args.config, args.overrides, **knobs)    # a bad config: one error, no processes
    layouts = args.layouts.split(",")
    depths = [int(x) for x in args.layers.split(",")]
    print(f"compile time of one {'LoRA' if cfg.lora.enabled else 'full'} train step, {cfg.model.preset} "
          f"(depth varied), remat {cfg.model.remat}, batch {cfg.train.batch_size} x seq "
          f"{cfg.data.seq_len}, {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{'layers':>6} " + " ".join(f"{lay + ' build':>11} {lay + ' lower':>11} "
                                       f"{lay + ' compile':>13} {lay + ' step':>10}" for lay in layouts))
    rows = []
    passthrough = [*(f"--config={c}" for c in args.config or ()),
                   *(f"--{k}={v}" for k, v in knobs.items() if k != "full" and v is not None),
                   *(["--full"] if args.full else []), *args.overrides]
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
        write_file(args.json, json.dumps(rows, indent=2))
    return 0
