"""Attention benchmark: ``python -m medjax.bench attention [--shapes gpu] [--mode fwdbwd] ...``.

``--compile-only tpu`` instead compiles the Pallas kernels for TPU chips on this CPU and
reports compile time and VMEM per case (``_attention_tpu.py``).

Per shape and implementation it prints the median time, achieved TFLOP/s counting only unmasked
(query, key) pairs, the compiled peak memory, and the speed relative to cuDNN
(``jax.nn.dot_product_attention(implementation="cudnn")``) and to jax's shipped Pallas GPU
kernel (``jax.experimental.pallas.ops.gpu.attention.mha``), all measured in the same run.

FLOPs: forward = 4 * pairs * D per query head (QK^T and PV); backward = 2.5x forward (recompute
QK^T, plus dV, dP, dQ, dK); "fwdbwd" = 3.5x forward. Peak memory is XLA's compiled estimate
(arguments + outputs + temporaries) of the benchmarked function, the same measure on every backend.

Implementations: ``reference`` (autodiff through the plain XLA math, the ground truth),
``xla`` (medjax's CPU path: closed-form backward, causal block skip), ``pallas`` (medjax kernels; interpret mode on CPU),
``cudnn`` (GPU only), ``jax-pallas`` (jax's shipped kernel; no GQA, so K/V are repeated for it;
interpret mode on CPU). Rows that cannot run say why instead of a time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from medjax.ops.attention import attention, attention_mask, attention_reference, cudnn_supports

SHAPES = {
    # (B, T, Hq, Hkv, D): the GPU table and CPU-sized smoke shapes.
    "gpu": [(b, t, 32, 8, 128) for t in (2048, 4096, 8192) for b in (1, 2, 4, 8)],
    "cpu": [(1, 128, 8, 2, 64), (1, 256, 8, 2, 64), (1, 512, 9, 3, 64)],   # last: SmolLM2
}
IMPLEMENTATIONS = ("reference", "xla", "pallas", "cudnn", "jax-pallas")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def unmasked_pairs(B, T, *, causal, window) -> int:
    """Visible (query, key) pairs per head, from the same mask the kernels implement."""
    q = jax.ShapeDtypeStruct((1, T, 1, 1), jnp.float32)
    mask = attention_mask(q, q, causal=causal, sliding_window=window)
    return B * int(np.asarray(mask).sum())


def _jax_pallas_mha(q, k, v, *, causal, window, interpret):
    from jax.experimental.pallas.ops.gpu import attention as shipped
    if window is not None:
        raise NotImplementedError("jax's Pallas GPU kernel has no sliding window")
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)   # it has no GQA
    blocks = shipped.BlockSizes(block_q=64, block_k=64, block_q_dkv=32, block_kv_dkv=32,
                                block_q_dq=32, block_kv_dq=32)
    return shipped.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal,
                       block_sizes=blocks, interpret=interpret)


def attention_fn(impl, *, causal, window):
    """``f(q, k, v) -> out`` for one implementation, or raise NotImplementedError with why."""
    platform = jax.default_backend()
    if impl == "reference":
        return lambda q, k, v: attention_reference(q, k, v, causal=causal, sliding_window=window)
    if impl == "xla":
        return lambda q, k, v: attention(q, k, v, causal=causal, sliding_window=window,
                                         implementation="xla")
    if impl == "pallas":
        return lambda q, k, v: attention(q, k, v, causal=causal, sliding_window=window,
                                         implementation="pallas")
    if impl == "cudnn":
        if platform != "gpu":
            raise NotImplementedError(f"unavailable on {platform} (needs a CUDA GPU)")
        return lambda q, k, v: attention(q, k, v, causal=causal, sliding_window=window,
                                         implementation="cudnn")
    if impl == "jax-pallas":
        if platform not in ("gpu", "cpu"):
            raise NotImplementedError(f"GPU kernel; unavailable on {platform}")
        return lambda q, k, v: _jax_pallas_mha(q, k, v, causal=causal, window=window,
                                               interpret=platform == "cpu")
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLEMENTATIONS}")


def _with_backward(fn):
    def fwd_bwd(q, k, v, cotangent):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, *vjp(cotangent)
    return fwd_bwd


def measure(fn, args, *, warmup, iters):
    """(median seconds, compiled peak bytes, last output) of ``jit(fn)(*args)``."""
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak, out


def run_shape(shape, *, dtype, mode, impls, causal, window, warmup, iters):
    B, T, Hq, Hkv, D = shape
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, Hq, D), dtype)
    k = jax.random.normal(keys[1], (B, T, Hkv, D), dtype)
    v = jax.random.normal(keys[2], (B, T, Hkv, D), dtype)
    cotangent = jax.random.normal(keys[3], (B, T, Hq, D), dtype)
    flops = 4.0 * unmasked_pairs(B, T, causal=causal, window=window) * Hq * D
    flops *= 3.5 if mode == "fwdbwd" else 1.0
    rows = []
    for impl in impls:
        row = dict(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, dtype=jnp.dtype(dtype).name, mode=mode,
                   impl=impl, causal=causal, window=window)
        try:
            fn = attention_fn(impl, causal=causal, window=window)
            if impl == "cudnn":
                reason = cudnn_supports(q, k, causal=causal)
                if reason:
                    raise NotImplementedError(reason)
            if mode == "fwdbwd":
                seconds, peak, _ = measure(_with_backward(fn), (q, k, v, cotangent),
                                        warmup=warmup, iters=iters)
            else:
                seconds, peak, _ = measure(fn, (q, k, v), warmup=warmup, iters=iters)
            row.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12, peak_mib=
                       None if peak is None else peak / 2**20)
        except Exception as e:  # a row that cannot run says why (OOM, unsupported, ...)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        rows.append(row)
    by_impl = {r["impl"]: r.get("ms") for r in rows}
    for row in rows:
        for peer, key in (("cudnn", "vs_cudnn"), ("jax-pallas", "vs_jax_pallas")):
            if row.get("ms") and by_impl.get(peer):
                row[key] = by_impl[peer] / row["ms"]     # > 1: faster than the peer
    return rows


def format_table(rows) -> str:
    head = ("| B | T | Hq/Hkv | D | impl | time ms | TFLOP/s | peak MiB | x cuDNN | x jax-pallas |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)
    lines = [head]
    for r in rows:
        if "error" in r:
            cells = [r["error"], "", "", "", ""]
        else:
            cells = [fmt(r["ms"], ".3f"), fmt(r["tflops"], ".3g"), fmt(r["peak_mib"], ".1f"),
                     fmt(r.get("vs_cudnn"), ".2f"), fmt(r.get("vs_jax_pallas"), ".2f")]
        lines.append(f"| {r['B']} | {r['T']} | {r['Hq']}/{r['Hkv']} | {r['D']} | {r['impl']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.bench attention",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=("auto", *SHAPES), default="auto",
                        help="shape preset; auto = gpu on a GPU, else cpu")
    parser.add_argument("--shape", action="append", default=[], metavar="B,T,HQ,HKV,D",
                        help="extra shape(s), e.g. 1,4096,32,8,128 (replaces the preset)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--mode", choices=("fwd", "fwdbwd", "both"), default="both")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                        help=f"comma list from {IMPLEMENTATIONS}")
    parser.add_argument("--no-causal", action="store_true", help="full (bidirectional) attention")
    parser.add_argument("--window", type=int, default=None, help="sliding window (Mistral)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=None, help="default: 10 on GPU/TPU, 3 on CPU")
    parser.add_argument("--json", default=None, help="also write all rows to this JSON file")
    parser.add_argument("--compile-only", choices=("tpu",), default=None,
                        help="compile the Pallas kernels for TPU chips on this CPU (needs "
                             "`make tpu-venv`) and print compile time / VMEM per case")
    parser.add_argument("--chips", default="v5p,v6e", help="with --compile-only: chip list")
    parser.add_argument("--cases", choices=("matrix", "ci"), default="matrix",
                        help="with --compile-only: B x T x heads matrix, or the test's cases")
    args = parser.parse_args(argv)
    if args.compile_only:
        from medjax.bench import _attention_tpu
        return _attention_tpu.main(args, list(argv if argv is not None else sys.argv[2:]))

    platform = jax.default_backend()
    preset = args.shapes if args.shapes != "auto" else ("gpu" if platform == "gpu" else "cpu")
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] or SHAPES[preset]
    if any(len(s) != 5 for s in shapes):
        parser.error("--shape takes five integers B,T,HQ,HKV,D")
    dtype = DTYPES[args.dtype or ("float32" if platform == "cpu" else "bfloat16")]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = sorted(set(impls) - set(IMPLEMENTATIONS))
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}; choose from {IMPLEMENTATIONS}")
    iters = args.iters or (3 if platform == "cpu" else 10)
    modes = ("fwd", "fwdbwd") if args.mode == "both" else (args.mode,)
    device = jax.devices()[0]
    print(f"# attention benchmark on {platform} ({getattr(device, 'device_kind', device)}), "
          f"jax {jax.__version__}, {jnp.dtype(dtype).name}, causal={not args.no_causal}, "
          f"window={args.window}" + (" [Pallas in interpret mode]" if platform == "cpu" else ""))
    all_rows = []
    for mode in modes:
        rows = []
        for shape in shapes:
            rows += run_shape(shape, dtype=dtype, mode=mode, impls=impls,
                              causal=not args.no_causal, window=args.window,
                              warmup=args.warmup, iters=iters)
        print(f"\n## {mode}\n{format_table(rows)}", flush=True)
        all_rows += rows
    if args.json:
        from medjax.outputs import write_file
        write_file(args.json, json.dumps(dict(platform=platform, device=str(device), jax=jax.__version__,
                                              rows=all_rows), indent=1))
    return 0
