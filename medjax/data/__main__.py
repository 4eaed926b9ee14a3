"""``python -m medjax.data inspect --config FILE [key=value ...]``: look at a dataset before training.
``python -m medjax.data decontaminate --config FILE [--tasks ...] [--n 13] [--out DIR]``: which
training rows share an n-gram with a benchmark test item (report.md + report.json in DIR).

Prints a few examples as the model sees them, with the scored (loss-mask) tokens in ``[[...]]``
(or bright, unscored dimmed, on a terminal), a histogram of example lengths in tokens, and the
packing efficiency (fraction of non-pad positions) over the first batches.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def _show(tokenizer, ids, scored, color: bool) -> str:
    """Tokens of one example; runs of scored tokens bracketed (or highlighted)."""
    out, run, run_scored = [], [], None
    for token, is_scored in zip(ids, scored):
        if run and is_scored != run_scored:
            out.append(_run(tokenizer, run, run_scored, color))
            run = []
        run.append(int(token))
        run_scored = is_scored
    if run:
        out.append(_run(tokenizer, run, run_scored, color))
    return "".join(out)


def _run(tokenizer, ids, scored, color):
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if color:
        return f"\033[1;32m{text}\033[0m" if scored else f"\033[2m{text}\033[0m"
    return f"[[{text}]]" if scored else text


def histogram(lengths, bins: int = 10, width: int = 40) -> str:
    lengths = np.asarray(lengths)
    counts, edges = np.histogram(lengths, bins=bins)
    lines = [f"{len(lengths)} examples, tokens: min {lengths.min()}, median {int(np.median(lengths))}, "
             f"max {lengths.max()}"]
    for count, lo, hi in zip(counts, edges[:-1], edges[1:]):
        bar = "#" * int(round(width * count / max(counts.max(), 1)))
        lines.append(f"  {int(lo):>6}-{int(hi):<6} {count:>6} {bar}")
    return "\n".join(lines)


def inspect(args) -> int:
    from medjax.config import load_config
    from medjax.data import make_dataset, packing_efficiency
    from medjax.data.pipeline import _Encode, resolve_sources
    from medjax.data.sources import SkipLog
    from medjax.errors import ConfigError
    from medjax.tokenizer import load_tokenizer, preset_tokenizer

    cfg = load_config(args.config, args.overrides)
    tokenizer_path = args.tokenizer or cfg.model.path
    # a tiny-* preset (model=tiny) has its byte-level tokenizer
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else preset_tokenizer(cfg.model.preset)
    if tokenizer is None:
        raise ConfigError("no tokenizer: set model.path or pass --tokenizer DIR|FILE")
    data, seq_len = cfg.data, cfg.data.seq_len
    skips = SkipLog()
    sources = resolve_sources(data, tokenizer, skips=skips)
    encode = _Encode(sources, tokenizer, seq_len, data.long_examples, data.on_error, skips)
    color = sys.stdout.isatty() and not args.no_color
    print(f"tokenizer: {tokenizer}\nsources: " + ", ".join(f"{s.name} ({len(s.rows)} rows, weight {s.weight}, "
                                                           f"format {s.renderer.format})" for s in sources))
    lengths = []
    for si, source in enumerate(sources):
        n = min(len(source.rows), args.lengths)
        for i in range(n):
            for example in encode((si, source.rows[i])):
                lengths.append(len(example.get("input_ids", example.get("chosen_input_ids"))))
        for i in range(min(args.examples, len(source.rows))):
            row = source.rows[i]
            for example in encode((si, row))[:1]:
                print(f"\n--- {row.where} ({source.renderer.format}) " + "-" * 20)
                for prefix in [p for p in ("", "chosen_", "rejected_") if p + "input_ids" in example]:
                    ids, mask = example[prefix + "input_ids"], example[prefix + "loss_mask"]
                    scored = np.concatenate([[False], mask[:-1] > 0])  # token t+1 is scored when mask[t] = 1
                    print((prefix.rstrip("_") + ": " if prefix else "") + _show(tokenizer, ids, scored, color))
                    print(f"  ({len(ids)} tokens, {int(mask.sum())} scored)")
    if lengths:
        print("\nexample lengths (first rows of each source):\n" + histogram(lengths))
    it = make_dataset(data, tokenizer, batch_size=cfg.train.batch_size, seq_len=seq_len, seed=data.seed,
                      process_index=0, process_count=1, num_epochs=1)
    efficiencies = []
    for _, batch in zip(range(args.batches), it):
        efficiencies.append(packing_efficiency(batch))
    if efficiencies:
        print(f"\npacking ({'on' if data.pack else 'off'}, seq_len {seq_len}, batch {cfg.train.batch_size}): "
              f"non-pad fraction {np.mean(efficiencies):.3f} over {len(efficiencies)} batches")
    print(skips.summary() if skips.count else "no bad rows")
    return 0


def decontaminate(args) -> int:
    import time
    from pathlib import Path

    from medjax.data import contamination
    from medjax.data.decontaminate import DEFAULT_TASKS, check_n
    from medjax.errors import ConfigError
    from medjax.eval.report import write_json
    from medjax.config import load_config

    check_n(args.n)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    cfg = load_config(args.config, args.overrides)
    tasks = args.tasks.split(",") if args.tasks else (cfg.data.decontaminate or DEFAULT_TASKS)
    t0 = time.perf_counter()
    rep = contamination.report(cfg.data, tasks, cfg.eval.data_dir, n=args.n, workers=args.workers)
    rep["wall_s"] = time.perf_counter() - t0
    text = contamination.markdown(rep)
    out = Path(args.out)
    write_json(out / "report.json", rep)
    (out / "report.md").write_text(text, encoding="utf-8")
    print(text)
    scan = rep["scan"]
    print(f"scanned {scan['bytes'] / 1e6:.1f} MB in {scan['scan_s']:.1f}s ({scan['mb_per_s']:.1f} MB/s); "
          f"wrote {out / 'report.md'} and {out / 'report.json'}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print rendered, tokenized examples with the loss mask, "
                                       "a length histogram and packing efficiency")
    p.add_argument("--config", required=True, action="append",
                   help="run config YAML (its data: and model: sections are used); repeat to overlay "
                        "files, later ones win (e.g. --config configs/tiny/llama2.yaml)")
    p.add_argument("--tokenizer", help="tokenizer dir/file/.gguf (default: model.path)")
    p.add_argument("--examples", type=int, default=3, help="examples shown per source")
    p.add_argument("--lengths", type=int, default=2000, help="rows per source measured for the histogram")
    p.add_argument("--batches", type=int, default=20, help="batches measured for packing efficiency")
    p.add_argument("--no-color", action="store_true", help="bracket scored tokens even on a terminal")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.seq_len=1024")
    d = sub.add_parser("decontaminate", help="report the training rows that share an n-gram with a "
                                             "benchmark test item (report.md, report.json)")
    d.add_argument("--config", required=True, action="append",
                   help="run config YAML (its data sources are scanned; eval.data_dir holds the test "
                        "files); repeat to overlay files")
    d.add_argument("--tasks", help="comma-separated eval tasks/groups (default: data.decontaminate, else "
                                   "medqa_4options,medmcqa,pubmedqa,mmlu_medical)")
    d.add_argument("--n", type=int, default=13, help="n-gram length in normalised words (>= 5; default 13)")
    d.add_argument("--out", default="runs/decontaminate", help="directory for report.md and report.json")
    d.add_argument("--workers", type=int, default=None, help="scan processes (default: every core)")
    d.add_argument("overrides", nargs="*", help="key=value config overrides (model=tiny, eval.data_dir=DIR ...)")
    args, extra = parser.parse_known_args(argv)     # key=value overrides may sit between options
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    return decontaminate(args) if args.command == "decontaminate" else inspect(args)


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
