"""The parts of ``python -m medjax.bench gpu``, each run in a process of its own by ``gpu.py``:

    python -m medjax.bench._gpu_parts PART --rows FILE [--dry-run] [--device-kind KIND]

A part appends one JSON object per finished row to FILE (rows finished before a timeout
survive) and, if it fails as a whole, a last ``{"error": ...}`` line. Every framework-side
measurement reuses the project's benchmark modules (``attention``, ``train``, ``moe``) or the
library itself (``Scorer``, ``Generator``); jax and torch sides each run in a fresh spawned
process (``train.isolated``), so neither holds GPU memory or threads while the other runs.
Full shapes are the issue's; ``--dry-run`` runs the same code at tiny shapes on this backend
(CPU: Pallas in interpret mode, no cuDNN).

Row keys: ``part``, ``case``, ``impl``, ``ms`` (median time of one step / call), ``rate`` +
``unit`` (tokens/s, items/s), ``tflops``, ``mfu`` (against ``ops/hardware.py``' bf16 peak of
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

import numpy as np

from medjax.errors import ConfigError

FULL = {
    # Llama-2-7B heads (32 x 128 MHA) and Llama-3-8B GQA (32 query / 8 KV heads).
    "attention": dict(seqs=(2048, 4096, 8192, 32768), heads=((32, 32), (32, 8)), D=128, batch=1,
                      iters=5),
    "train": dict(model="preset:llama2-7b", seq=4096, batches=(1, 2, 4), rank=64, steps=3),
    # MedQA test prompts are 111..381 tokens (5th..95th percentile, mean 220; SmolLM2's tokenizer
    # over the 1273 prompts of ../shared/data/benchmarks, 2026-12-06); letters scored as one token.
    "mcqa": dict(preset="llama2-7b", items=256, lengths=(111, 381), hf_batch=32),
    "decode": dict(preset="llama2-7b", batches=(1, 16), prompt=128, new=512),
    "moe": dict(tokens=4096, preset="mixtral-8x7b", steps=5),     # the preset's exact width
}
DRY = {
    "attention": dict(seqs=(64,), heads=((4, 4), (4, 1)), D=32, batch=1, iters=1),
    "train": dict(model="preset:tiny-llama2", seq=32, batches=(1,), rank=4, steps=1),
    "mcqa": dict(preset="tiny-llama2", items=12, lengths=(10, 40), hf_batch=4),
    "decode": dict(preset="tiny-llama2", batches=(1, 2), prompt=8, new=8),
    "moe": dict(tokens=32, preset="tiny-mixtral", steps=1),
}
DTYPE = "bfloat16"
REFERENCE_MAX_SCORE_BYTES = 16 * 2**30   # fp32 [B, H, T, T] scores of the reference (T=8k: 8 GiB)
LETTERS = (65, 66, 67, 68)               # the four answer-letter token ids (any ids below vocab)


def _err(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def _peak(device_kind):
    from medjax.ops.hardware import chip_of
    chip = chip_of(device_kind or "")
    return chip.bf16_flops if chip else None


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
        row = dict(impl="pallas", error=_err(e))
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
                    row = dict(case=f"T={T} {Hq}/{Hkv} heads x {size['D']}", impl=impl, error=_err(e))
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
    peak = _peak(device_kind)
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
            emit(dict(case=case, impl="medjax", error=_err(e)))
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
            emit(dict(case=case, impl="transformers+peft", error=_err(e)))


# ----------------------------------------------------------------------------- mcqa
def _contexts(size, vocab):
    rng = np.random.default_rng(0)
    lo, hi = size["lengths"]
    return [rng.integers(3, vocab, n).tolist() for n in rng.integers(lo, hi + 1, size["items"])]


def _peak_gib_jax():
    import jax
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30 or None


def score_medjax(size) -> dict:
    """medjax's Scorer (the eval runner's) on the items: first pass compiles, second is timed."""
    import jax.numpy as jnp

    from medjax.eval.requests import Item, Request
    from medjax.eval.scorer import Scorer
    from medjax.models import get_preset, init_decoder
    cfg = get_preset(size["preset"])
    model = init_decoder(cfg, dtype=jnp.dtype(DTYPE), param_dtype=jnp.dtype(DTYPE))
    contexts = _contexts(size, min(cfg.vocab_size, 32000))

    def items():
        return [Item(task="medqa", index=i, doc={}, context="", continuations=list("ABCD"),
                     choice_texts=list("ABCD"), gold=0,
                     requests=[Request(tuple(c), (t,)) for t in LETTERS])
                for i, c in enumerate(contexts)]
    scorer = Scorer(model, pad_id=0)
    start = time.perf_counter()
    scorer.score(items(), desc="medjax warm-up")
    first = time.perf_counter() - start
    timed = items()
    start = time.perf_counter()
    scorer.score(timed, desc="medjax")
    seconds = time.perf_counter() - start
    assert all(r.loglikelihood is not None for it in timed for r in it.requests)
    return {"s": seconds, "first_s": first, "peak_gib": _peak_gib_jax()}


def _hf_model(preset: str):
    """A random-weight transformers model of a medjax preset on the GPU (CPU without one)."""
    import torch
    import transformers

    from medjax.models import get_preset
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = get_preset(preset).to_hf_config(DTYPE)
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, DTYPE))
    return model.eval(), device


def score_hf(size) -> dict:
    """Batched transformers forward, contexts sorted by length and right-padded, the four
    letters' log-probs read at each context's last token: first pass warms up, second timed."""
    import torch

    from medjax.models import get_preset
    model, device = _hf_model(size["preset"])
    contexts = sorted(_contexts(size, min(get_preset(size["preset"]).vocab_size, 32000)), key=len)
    letters = torch.tensor(LETTERS, device=device)

    @torch.inference_mode()
    def run():
        out = []
        for start in range(0, len(contexts), size["hf_batch"]):
            chunk = contexts[start:start + size["hf_batch"]]
            L = max(map(len, chunk))
            ids = torch.zeros(len(chunk), L, dtype=torch.long)
            mask = torch.zeros(len(chunk), L, dtype=torch.long)
            for b, c in enumerate(chunk):
                ids[b, :len(c)], mask[b, :len(c)] = torch.tensor(c), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            last = logits[torch.arange(len(chunk), device=device), mask.sum(1).to(device) - 1]
            out.append(torch.log_softmax(last.float(), -1)[:, letters].cpu())
        return torch.cat(out)

    run()
    start = time.perf_counter()
    scores = run()
    seconds = time.perf_counter() - start
    assert scores.shape == (len(contexts), 4)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"s": seconds, "peak_gib": peak}


def mcqa(size, emit, device_kind):
    """Letter scoring of MedQA-length prompts: medjax's Scorer vs a batched transformers forward."""
    from medjax.bench.train import isolated
    n = size["items"]
    case = f"{n} MedQA-length prompts, {size['preset']}"
    mj_ms = None
    try:
        mj = isolated(score_medjax, size)
        mj_ms = mj["s"] * 1e3
        emit(dict(case=case, impl="medjax Scorer", ms=mj_ms, rate=n / mj["s"], unit="items/s",
                  peak_gib=mj["peak_gib"], note=f"first pass (compiles) {mj['first_s']:.1f} s"))
    except Exception as e:
        emit(dict(case=case, impl="medjax Scorer", error=_err(e)))
    try:
        hf = isolated(score_hf, size)
        row = dict(case=case, impl=f"transformers forward, batch {size['hf_batch']}",
                   ms=hf["s"] * 1e3, rate=n / hf["s"], unit="items/s", peak_gib=hf["peak_gib"])
        if mj_ms:
            row.update(vs="medjax Scorer", speedup=row["ms"] / mj_ms)
        emit(row)
    except Exception as e:
        emit(dict(case=case, impl="transformers forward", error=_err(e)))


# ----------------------------------------------------------------------------- decode
def _prompts(batch, length, vocab):
    return np.random.default_rng(1).integers(3, vocab, (batch, length)).tolist()


def _each_batch(size, one) -> list[dict]:
    """``one(batch)`` for every batch size in one process (one model init, one import); a batch
    that fails (out of memory, ...) gives ``{"error": ...}`` and the next one runs."""
    results = []
    for batch in size["batches"]:
        try:
            results.append(one(batch))
        except Exception as e:
            results.append({"error": _err(e)})
    return results


def decode_medjax(size) -> list[dict]:
    """medjax's KV-cache Generator, greedy, no stop tokens: a warm-up call (compiles), then timed."""
    import jax.numpy as jnp

    from medjax.eval.generate import Generator
    from medjax.models import get_preset, init_decoder
    cfg = get_preset(size["preset"])
    gen = Generator(init_decoder(cfg, dtype=jnp.dtype(DTYPE), param_dtype=jnp.dtype(DTYPE)))

    def one(batch):
        prompts = _prompts(batch, size["prompt"], min(cfg.vocab_size, 32000))
        gen.generate(prompts, max_new_tokens=size["new"])
        start = time.perf_counter()
        out = gen.generate(prompts, max_new_tokens=size["new"])
        seconds = time.perf_counter() - start
        assert all(len(o) == size["new"] for o in out)
        return {"s": seconds, "peak_gib": _peak_gib_jax()}
    return _each_batch(size, one)


def decode_hf(size) -> list[dict]:
    """``transformers`` ``generate`` (greedy, its default KV cache), exactly ``new`` tokens."""
    import torch

    from medjax.models import get_preset
    model, device = _hf_model(size["preset"])
    vocab = min(get_preset(size["preset"]).vocab_size, 32000)

    def one(batch):
        ids = torch.tensor(_prompts(batch, size["prompt"], vocab), device=device)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                  eos_token_id=None)
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=size["new"], min_new_tokens=size["new"], **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert out.shape == (batch, size["prompt"] + size["new"])
        return {"s": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30
                if device == "cuda" else None}
    return _each_batch(size, one)


def decode(size, emit, device_kind):
    """Greedy decode tokens/s: medjax's Generator vs ``transformers.generate``, each framework in
    one process for all batch sizes."""
    from medjax.bench.train import isolated
    results = {}
    for impl, fn in (("medjax Generator", decode_medjax), ("transformers.generate", decode_hf)):
        try:
            results[impl] = isolated(fn, size)
        except Exception as e:
            results[impl] = [{"error": _err(e)}] * len(size["batches"])
        for batch, r in zip(size["batches"], results[impl]):
            case = f"{size['preset']} batch {batch}, prompt {size['prompt']}, {size['new']} new tokens"
            row = dict(case=case, impl=impl, error=r.get("error"))
            if "s" in r:
                row.update(ms=r["s"] * 1e3, rate=batch * size["new"] / r["s"], unit="tokens/s",
                           peak_gib=r["peak_gib"])
                ours = dict(zip(size["batches"], results["medjax Generator"]))[batch]
                if impl != "medjax Generator" and "s" in ours:
                    row.update(vs="medjax Generator", speedup=r["s"] / ours["s"])
            emit({k: v for k, v in row.items() if v is not None})


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
        emit(dict(case=case, impl="transformers MixtralSparseMoeBlock", error=_err(e)))
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
            f.write(json.dumps({"error": _err(e)}) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
