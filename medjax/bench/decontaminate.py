"""``python -m medjax.bench decontaminate [--size-mb 1024] [--n 13]``: decontamination scan speed.

Writes a synthetic training corpus (alpaca JSON lines of words drawn from the test vocabulary,
with test questions planted every ``--plant-every`` rows) of ``--size-mb`` MB to a temporary
directory, then scans it against a synthetic test set of ``--items`` items with

- ``medjax``: ``medjax.data.decontaminate`` (hashed n-gram index, numpy blocks, a process per core);
- ``naive``: one Python process, a ``set`` of n-gram tuples, every row's n-grams looked up.

and prints MB/s (training text bytes per second of scan) for each, the rows each flagged and
whether they agree. The corpus is deleted afterwards. ``--naive-mb`` caps the naive peer's share
of the corpus (default: all of it) when its time would be too long.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_items(n_items: int, vocab: list[str], rng) -> list[str]:
    return [" ".join(vocab[i] for i in rng.integers(0, len(vocab), rng.integers(20, 80))).capitalize() + "?"
            for _ in range(n_items)]


def write_corpus(path: Path, size_mb: float, vocab: list[str], questions: list[str], plant_every: int, rng) -> int:
    """Alpaca rows of random vocabulary words, a test question planted every ``plant_every`` rows;
    returns the number of planted rows."""
    words, target, planted, row = np.array(vocab), int(size_mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < target:
            ids = rng.integers(0, len(words), (512, 90))
            lines = []
            for k in range(len(ids)):
                text = " ".join(words[ids[k]])
                row += 1
                if row % plant_every == 0:
                    text = f"{text[:200]} {questions[(row // plant_every) % len(questions)].upper()} {text[200:]}"
                    planted += 1
                lines.append(json.dumps({"instruction": text[:150], "input": "", "output": text[150:]}) + "\n")
            f.write("".join(lines))
    return planted


def naive_scan(path: Path, questions: list[str], n: int, max_bytes: int | None) -> tuple[set[str], int, int]:
    """The peer: a set of n-gram tuples and a Python loop over every n-gram of every row;
    returns (flagged rows, text bytes, the last line read)."""
    from medjax.data.decontaminate import normalize, record_texts
    grams = set()
    for q in questions:
        tokens = normalize(q)
        grams.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    flagged, nbytes, last = set(), 0, 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if max_bytes is not None and nbytes >= max_bytes:
                break
            last = line_no
            for text in record_texts(json.loads(raw)):
                nbytes += len(text.encode("utf-8"))
                tokens = normalize(text)
                if any(tuple(tokens[i:i + n]) in grams for i in range(len(tokens) - n + 1)):
                    flagged.add(f"{path}:{line_no}")
    return flagged, nbytes, last


def main(argv=None) -> int:
    from medjax.data import decontaminate as dc
    from medjax.data import decontaminate_scan as scan

    p = argparse.ArgumentParser(prog="python -m medjax.bench decontaminate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=1024, help="synthetic corpus size in MB (default 1024)")
    p.add_argument("--naive-mb", type=float, default=None, help="scan only the first MB with the naive peer")
    p.add_argument("--items", type=int, default=5000, help="synthetic test items (default 5000)")
    p.add_argument("--vocab", type=int, default=20000, help="test vocabulary size (default 20000)")
    p.add_argument("--plant-every", type=int, default=5000, help="a test question every N rows")
    p.add_argument("--n", type=int, default=13, help="n-gram length (default 13)")
    p.add_argument("--workers", type=int, default=None, help="scan processes (default: every core)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    dc.check_n(args.n)
    rng = np.random.default_rng(0)
    vocab = [f"w{i}x{rng.integers(0, 10**6)}" for i in range(args.vocab)]
    questions = synthetic_items(args.items, vocab, rng)
    workdir = Path(tempfile.mkdtemp(prefix="medjax-decontaminate-bench-"))
    try:
        corpus = workdir / "corpus.jsonl"
        t0 = time.perf_counter()
        planted = write_corpus(corpus, args.size_mb, vocab, questions, args.plant_every, rng)
        print(f"corpus: {corpus.stat().st_size / 1e6:.0f} MB, {planted} planted rows, written in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        t0 = time.perf_counter()
        index = dc.BenchmarkIndex.build([("synthetic", str(i), str(i), [q]) for i, q in enumerate(questions)], args.n)
        index_s = time.perf_counter() - t0
        workers = args.workers or os.cpu_count() or 1
        t0 = time.perf_counter()
        result = scan.scan_sources(index, scan.plan_chunks([{"path": str(corpus)}]), workers=workers)[str(corpus)]
        fast_s = time.perf_counter() - t0
        fast_rows = {m.row for m in result["matches"]}
        cap = None if args.naive_mb is None else int(args.naive_mb * 1e6)
        t0 = time.perf_counter()
        naive_rows, naive_bytes, last_line = naive_scan(corpus, questions, args.n, cap)
        naive_s = time.perf_counter() - t0
        fast_in_naive = {r for r in fast_rows if int(r.rsplit(":", 1)[1]) <= last_line}
        rows = [{"method": f"medjax ({workers} processes)", "mb": result["bytes"] / 1e6, "s": fast_s,
                 "mb_per_s": result["bytes"] / 1e6 / fast_s, "flagged_rows": len(fast_rows)},
                {"method": "naive set-of-tuples (1 process)", "mb": naive_bytes / 1e6, "s": naive_s,
                 "mb_per_s": naive_bytes / 1e6 / naive_s, "flagged_rows": len(naive_rows)}]
        print(f"index: {args.items} items, {len(index.hashes)} {args.n}-grams, built in {index_s:.2f}s")
        print("| method | MB of text | s | MB/s | flagged rows |\n|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {r['mb']:.0f} | {r['s']:.1f} | {r['mb_per_s']:.1f} | {r['flagged_rows']} |")
        agree = cap is None and fast_rows == naive_rows and len(fast_rows) == planted
        load = os.getloadavg()[0]
        print(f"load average {load:.1f} on {os.cpu_count()} cores (other processes share them); speed-up "
              f"{rows[0]['mb_per_s'] / rows[1]['mb_per_s']:.1f}x; flagged rows "
              f"{'identical' if fast_in_naive == naive_rows else 'DIFFER'} on the part both scanned; "
              f"planted {planted}, found {len(fast_rows)}")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "planted": planted, "agree": agree,
                                                  "load_average": load, "cores": os.cpu_count()}, indent=2))
        return 0 if fast_in_naive == naive_rows and len(fast_rows) == planted else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

