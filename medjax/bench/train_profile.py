"""``python -m medjax.bench train_profile``: where a train step's time goes, per op, for medjax
(XLA) and transformers + PEFT (torch) on the same step as ``bench train``.

Each side runs in a fresh process: one warm-up step, then ``--steps`` steps under the framework's
profiler (``jax.profiler.trace`` read back with ``jax.profiler.ProfileData``; ``torch.profiler``).
Ops are grouped by name (XLA: the fusion / thunk name with its numeric suffix dropped, so the
30 layers' copies of one op add up; torch: the aten op, self time) and printed with their share
of the summed op time. medjax also prints ``compiled.cost_analysis()``'s FLOPs and bytes and the
step's achieved GFLOP/s.
"""
from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time

from medjax.bench.train import (DEFAULT_MODEL, RANDOM_TOKEN_LIMIT, _batch, _preset,
                                     build_hf_step, build_medjax_step, isolated)

_SUFFIX = re.compile(r"(\.\d+)+$")


def _xla_ops(trace_dir) -> collections.Counter:
    """Summed duration (s) per op name over the host XLA thunk events of a trace."""
    from pathlib import Path
    from jax.profiler import ProfileData
    per_op = collections.Counter()
    for path in Path(trace_dir).rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(path)).planes:
            if plane.name != "/host:CPU":
                continue
            for line in plane.lines:
                for ev in line.events:
                    stats = dict(ev.stats)
                    if "hlo_op" in stats or "hlo_module" in stats:
                        per_op[_SUFFIX.sub("", stats.get("hlo_op", ev.name))] += ev.duration_ns / 1e9
    return per_op


def profile_medjax(model_path, lora, batch_np, steps, rank, top, remat=None, scan_layers=None):
    import jax
    import jax.numpy as jnp
    fn, state, frozen, reference, _ = build_medjax_step(model_path, lora, rank, "float32", remat,
                                                        scan_layers)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    cost = fn.lower(state, frozen, reference, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, m = fn(state, frozen, reference, batch)
    jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t = time.perf_counter()
            for _ in range(steps):
                state, m = fn(state, frozen, reference, batch)
                jax.block_until_ready(m)
            wall = (time.perf_counter() - t) / steps
        per_op = _xla_ops(d)
    return {"step_s": wall, "flops": cost.get("flops"), "bytes": cost.get("bytes accessed"),
            "ops": _top(per_op, steps, top)}


def profile_hf(model_path, lora, batch_np, steps, rank, top):
    import torch
    one, _ = build_hf_step(model_path, lora, batch_np, rank)
    one()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            one()
        wall = (time.perf_counter() - t) / steps
    per_op = collections.Counter()
    for ev in prof.key_averages():
        per_op[ev.key] += ev.self_cpu_time_total / 1e6
    return {"step_s": wall, "ops": _top(per_op, steps, top)}


def _top(per_op: collections.Counter, steps: int, top: int):
    total = sum(per_op.values()) or 1.0
    return [(name, round(t / steps, 4), round(t / total, 3)) for name, t in per_op.most_common(top)]


def _print(title, res):
    line = f"== {title}: step {res['step_s']:.3f} s (under the profiler)"
    if res.get("flops"):
        line += (f", cost_analysis {res['flops'] / 1e9:.1f} GFLOP, {res['bytes'] / 2**30:.2f} GiB "
                 f"accessed, {res['flops'] / res['step_s'] / 1e9:.1f} GFLOP/s")
    print(line)
    for name, sec, share in res["ops"]:
        print(f"  {100 * share:5.1f}%  {sec * 1e3:8.1f} ms/step  {name}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medjax.bench train_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="profiled steps after one warm-up")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--modes", default="lora,full", help="comma list of lora,full")
    p.add_argument("--top", type=int, default=15, help="ops printed per side")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers+peft side")
    p.add_argument("--scan-layers", choices=("true", "false"), default=None,
                   help="medjax's model.scan_layers (default: the trainer's default)")
    args = p.parse_args(argv)
    vocab = RANDOM_TOKEN_LIMIT
    if _preset(args.model):
        from medjax.models import get_preset
        vocab = min(vocab, get_preset(_preset(args.model)).vocab_size)
    batch = _batch(vocab, args.batch, args.seq)
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        lora = mode == "lora"
        scan = None if args.scan_layers is None else args.scan_layers == "true"
        _print(f"medjax {mode}", isolated(profile_medjax, args.model, lora, batch, args.steps,
                                          args.rank, args.top, None, scan))
        if not args.no_hf:
            _print(f"transformers+peft {mode}", isolated(profile_hf, args.model, lora, batch,
                                                         args.steps, args.rank, args.top))
    return 0
