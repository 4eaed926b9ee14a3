"""The parts of ``python -m medjax.bench gpu``, each run in a process of its own by ``gpu.py``:

    python -m medjax.bench._gpu_parts PART --rows FILE [--dry-run] [--device-kind KIND]

A part appends one JSON object per finished row to FILE (rows finished before a timeout
survive) and, if it fails as a whole, a last ``{"error": ...}`` line. Every framework-side
measurement reuses the project's benchmark modules (``attention``, ``train``, ``moe``) or the
library itself (``Scorer``, ``Generator``: the serving parts, ``_gpu_serving.py``; shapes in
``_gpu_sizes.py``); jax and torch sides each run in a fresh spawned
process (``train.isolated``), so neither holds GPU memory or threads while the other runs.
Full shapes are the issue's; ``--dry-run`` runs the same code at tiny shapes on this backend
(CPU: Pallas in interpret mode, no cuDNN).

Row keys: ``part``, ``case``, ``impl``, ``ms`` (median time of one step / call), ``rate`` +
``unit`` (tokens/s, items/s), ``tflops``, ``mfu`` (against ``ops.hardware``' bf16 peak of
this chip), ``peak_gib``, ``max_err`` (against the fp32 reference), ``vs`` + ``speedup`` (the
medjax row this one is compared with, and this row's time over it: > 1 = medjax faster),
``error``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from medjax.bench._gpu_serving import decode, mcqa
from medjax.bench._gpu_sizes import (DRY, DTYPE, FULL, REFERENCE_MAX_SCORE_BYTES, chip_peak_flops,
                                     error_text)
from medjax.errors import ConfigError


# ----------------------------------------------------------------------------- smoke
def smoke(size, emit, device_kind):
    """Versions, the device, one tiny LoRA train step (fatal if it fails) and one tiny Pallas
    attention forward + backward against the reference (recorded, not fatal)."""
    import importlib.metadata
    import platform

    import jax
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch",
                 "transformers", "peft", "triton"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device = jax.devices()[0]
    emit(dict(case="environment", impl="jax " + jax.__version__, backend=jax.default_backend(),
              device=str(getattr(device, "device_kind", device)), python=platform.python_version(),
              versions=versions, date=time.strftime("%Y-%m-%d")))
    from medjax.bench import train
    start = time.perf_counter()
    r = train.bench_medjax("preset:tiny-llama2", True, train._batch(256, 1, 32), 1, 4, DTYPE,
                           "full", True)
    emit(dict(case="tiny LoRA train step (remat, scan)", impl="medjax", ms=r["step_s"] * 1e3,
              note=f"loss {r['loss']:.3f}, {time.perf_counter() - start:.1f} s with compile"))
    try:
        row = _attention_row("pallas", (1, 128, 4, 1, 64), iters=1, with_reference=True)
    except Exception as e:  # the kernel path is reported, the check goes on
        row = dict(impl="pallas", error=error_text(e))
    emit(dict(row, case="tiny Pallas attention fwd+bwd"))


# ----------------------------------------------------------------------------- attention
def _attention_inputs(shape):
    import jax
    import jax.numpy as jnp
    B, T, Hq, Hkv, D = shape
    keys = jax.random.split(jax.random.key(0), 4)
    return (jax.random.normal(keys[0], (B, T, Hq, D), jnp.bfloat16),
            jax.random.normal(keys[1], (B, T, Hkv, D), jnp.bfloat16),
            jax.random.normal(keys[2], (B, T, Hkv, D), jnp.bfloat16),
            jax.random.normal(keys[3], (B, T, Hq, D), jnp.bfloat16))


def _reference(args):
    """fp32 output and (dq, dk, dv) of the plain-XLA reference, or None if its scores don't fit."""
    import jax
    import jax.numpy as jnp

    from medjax.bench import attention as bench
    B, T, Hq, _ = args[0].shape
    if B * Hq * T * T * 4 > REFERENCE_MAX_SCORE_BYTES:
        return None
    fn = bench._with_backward(bench.attention_fn("reference", causal=True, window=None))
    with jax.default_matmul_precision("highest"):      # no TF32 in the ground truth
        return jax.jit(fn)(*(a.astype(jnp.float32) for a in args))


def _attention_row(impl, shape, *, iters, with_reference, reference=None):
    import jax.numpy as jnp

    from medjax.bench import attention as bench
    from medjax.ops.attention import cudnn_supports
    B, T, Hq, Hkv, D = shape
    args = _attention_inputs(shape)
    row = dict(case=f"T={T} {Hq}/{Hkv} heads x {D}", impl=impl)
    fn = bench.attention_fn(impl, causal=True, window=None)
    if impl == "cudnn" and cudnn_supports(args[0], args[1], causal=True):
        raise NotImplementedError(cudnn_supports(args[0], args[1], causal=True))
    seconds, peak, out = bench.measure(bench._with_backward(fn), args, warmup=1, iters=iters)
    flops = 3.5 * 4.0 * bench.unmasked_pairs(B, T, causal=True, window=None) * Hq * D
    row.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12,
               peak_gib=None if peak is None else peak / 2**30)
    if reference is None and with_reference:
        reference = _reference(args)
    if reference is not None:     # max |error| over the output, dq, dk and dv
        row["max_err"] = max(float(jnp.max(jnp.abs(o.astype(jnp.float32) - r)))
                             for o, r in zip(out, reference))
    else:
        row["note"] = "reference does not fit: [B, H, T, T] fp32 scores"
    return row


def attention(size, emit, device_kind):
    """bf16 causal fwd+bwd: medjax Pallas, cuDNN through medjax's dispatch, medjax's XLA path."""
    for T in size["seqs"]:
        for Hq, Hkv in size["heads"]:
            shape = (size["batch"], T, Hq, Hkv, size["D"])
            try:
                reference = _reference(_attention_inputs(shape))
            except Exception:  # e.g. out of memory: the rows go on, without errors
                reference = None
            pallas_ms = None
            for impl in ("pallas", "cudnn", "xla"):
                try:
                    row = _attention_row(impl, shape, iters=size["iters"], with_reference=False,
                                         reference=reference)
                except Exception as e:  # unsupported, out of memory, ...: recorded, next row
                    row = dict(case=f"T={T} {Hq}/{Hkv} heads x {size['D']}", impl=impl, error=error_text(e))
                if impl == "pallas":
                    pallas_ms = row.get("ms")
                elif pallas_ms and row.get("ms"):
                    row.update(vs="pallas", speedup=row["ms"] / pallas_ms)
                emit(row)
            del reference


# ----------------------------------------------------------------------------- train
def train(size, emit, device_kind):
    """Llama-2-7B LoRA step (MELT: r64 on q,k,v,o,gate,up,down; remat full, scan) vs
    transformers + PEFT (SDPA, gradient checkpointing) at each batch size."""
    from medjax.bench import train as bench
    from medjax.models import get_preset
    peak = chip_peak_flops(device_kind)
    preset = get_preset(size["model"].split(":", 1)[1])
    seq, rank, steps = size["seq"], size["rank"], size["steps"]
    for batch in size["batches"]:
        data = bench._batch(min(bench.RANDOM_TOKEN_LIMIT, preset.vocab_size), batch, seq)
        tokens = batch * seq
        case = f"{size['model'].split(':', 1)[1]} LoRA r{rank}, seq {seq}, batch {batch}"
        flops = bench.model_flops_per_token(preset, seq, lora=True) * tokens
        mj_ms = None
        try:
            mj = bench.isolated(bench.bench_medjax, size["model"], True, data, steps, rank, DTYPE,
                                "full", True)
            mj_ms = mj["step_s"] * 1e3
            emit(dict(case=case, impl="medjax", ms=mj_ms, rate=tokens / mj["step_s"],
                      unit="tokens/s", tflops=flops / mj["step_s"] / 1e12,
                      mfu=peak and flops / mj["step_s"] / peak, peak_gib=mj["peak_gib"]))
        except Exception as e:
            emit(dict(case=case, impl="medjax", error=error_text(e)))
        try:
            hf = bench.isolated(bench.bench_hf, size["model"], True, data, steps, rank, DTYPE, True)
            row = dict(case=case, impl="transformers+peft", ms=hf["step_s"] * 1e3,
                       rate=tokens / hf["step_s"], unit="tokens/s",
                       tflops=flops / hf["step_s"] / 1e12, mfu=peak and flops / hf["step_s"] / peak,
                       peak_gib=hf["peak_gib"])
            if mj_ms:
                row.update(vs="medjax", speedup=row["ms"] / mj_ms)
            emit(row)
        except Exception as e:
            emit(dict(case=case, impl="transformers+peft", error=error_text(e)))


# ----------------------------------------------------------------------------- moe
def moe(size, emit, device_kind):
    """One Mixtral MoE layer fwd+bwd: grouped matmul vs the same active work as dense matmuls
    (and ragged_dot, and the whole medjax layer) vs transformers' MixtralSparseMoeBlock."""
    from medjax.bench import moe as bench
    from medjax.bench.train import isolated
    from medjax.models import get_preset
    cfg = get_preset(size["preset"])
    args = argparse.Namespace(tokens=size["tokens"], hidden=cfg.hidden_size,
                              ffn=cfg.intermediate_size, experts=cfg.num_experts,
                              top_k=cfg.num_experts_per_tok, steps=size["steps"], dtype=DTYPE)
    case = (f"{args.tokens} tokens, {args.hidden}/{args.ffn}, {args.experts} experts "
            f"top-{args.top_k}")
    active = 3 * 3 * 2 * args.tokens * args.top_k * args.hidden * args.ffn
    rows = isolated(bench.bench_jax, args)
    try:
        rows.append(isolated(bench.bench_transformers, vars(args)))
    except Exception as e:
        emit(dict(case=case, impl="transformers MixtralSparseMoeBlock", error=error_text(e)))
    seconds = {r["name"]: r["s"] for r in rows}
    peers = {"dense (same active work)": "grouped_matmul", "ragged_dot": "grouped_matmul",
             "transformers Mixtral": "medjax SparseMoE"}
    for r in rows:
        row = dict(case=case, impl=r["name"], ms=r["s"] * 1e3, tflops=active / r["s"] / 1e12)
        if r["name"] in peers:
            row.update(vs=peers[r["name"]], speedup=r["s"] / seconds[peers[r["name"]]])
        emit(row)


PARTS = {"smoke": smoke, "attention": attention, "train": train, "mcqa": mcqa, "decode": decode,
         "moe": moe}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medjax.bench._gpu_parts")
    p.add_argument("part", choices=tuple(PARTS))
    p.add_argument("--rows", required=True, help="append one JSON object per row here")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--device-kind", default=None, help="jax device_kind (for the chip's peak)")
    args = p.parse_args(argv)
    if not Path(args.rows).parent.is_dir():
        raise ConfigError(f"--rows {args.rows}: its directory does not exist")
    size = (DRY if args.dry_run else FULL).get(args.part, {})

    def emit(row):
        row = dict(row, part=args.part)
        print(json.dumps(row), flush=True)
        with open(args.rows, "a") as f:
            f.write(json.dumps(row) + "\n")

    try:
        PARTS[args.part](size, emit, args.device_kind)
    except Exception as e:  # the whole part failed: say why, the orchestrator goes on
        traceback.print_exc()
        with open(args.rows, "a") as f:
            f.write(json.dumps({"error": error_text(e)}) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
