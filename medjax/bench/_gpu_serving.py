"""The serving parts of ``python -m medjax.bench gpu`` (run by ``_gpu_parts.py``): MCQA scoring
(``Scorer`` vs transformers) and decoding (``Generator`` vs transformers ``generate``)."""
from __future__ import annotations

import time

import numpy as np

from medjax.bench._gpu_sizes import DTYPE, LETTERS, error_text


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
        emit(dict(case=case, impl="medjax Scorer", error=error_text(e)))
    try:
        hf = isolated(score_hf, size)
        row = dict(case=case, impl=f"transformers forward, batch {size['hf_batch']}",
                   ms=hf["s"] * 1e3, rate=n / hf["s"], unit="items/s", peak_gib=hf["peak_gib"])
        if mj_ms:
            row.update(vs="medjax Scorer", speedup=row["ms"] / mj_ms)
        emit(row)
    except Exception as e:
        emit(dict(case=case, impl="transformers forward", error=error_text(e)))


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
            results.append({"error": error_text(e)})
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
            results[impl] = [{"error": error_text(e)}] * len(size["batches"])
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
