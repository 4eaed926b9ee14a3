"""``python -m medjax.bench NAME [options]``: run the benchmark module ``medjax.bench.NAME``.

Every module in ``medjax/bench/`` that defines ``main(argv) -> int`` is a benchmark and has a
line in ``BENCHMARKS`` (what it measures, how long it takes); ``python -m medjax.bench NAME --help``
shows its options. With no name, every benchmark runs with its defaults, one after the other
(but those in ``NOT_IN_DEFAULT_RUN``).
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

import medjax.bench
from medjax.errors import ConfigError

# name -> (what it measures, how long its defaults took: `/usr/bin/time python -m medjax.bench NAME`
# on the 2-core AMD EPYC CPU shared with other jobs (load average ~12), 2026-12-06, unless noted)
BENCHMARKS = {
    "attention": ("median time, TFLOP/s and compiled peak memory of each attention implementation "
                  "(XLA, medjax's Pallas kernel, cuDNN, jax's Pallas GPU kernel) per shape",
                  "~100 s (--compile-only tpu: ~15 min for its 32 cases, docs/ATTENTION.md)"),
    "compile": ("compile time of one train step against the layer count, scanned layers vs a Python loop",
                "~4 min (239 s): one fresh process per (layout, depth)"),
    "data": ("data-pipeline tokens/s on one CPU core (seq 4096, packing) vs what a 7B LoRA step on "
             "one H100 consumes", "~47 s"),
    "decontaminate": ("MB/s of the benchmark-decontamination scan (hashed n-gram index, every core) "
                      "over a synthetic corpus with planted test questions, vs a naive Python "
                      "set-of-tuples scan", "~3.5 min at the default 1 GB (88 s + 123 s, docs/DATA.md)"),
    "eval": ("medjax.eval vs lm-evaluation-harness on SmolLM2-135M: accuracy, per-choice "
             "log-likelihood difference, wall time", "over 22 min: 488 s medjax + 851 s lm-eval (README table)"),
    "fullsize": ("a real-size random checkpoint (Llama-2-7B, or Mixtral-8x7B width cut to 2 layers) "
                 "through train, export (HF, PEFT, GGUF) and transformers: wall time and peak RSS per "
                 "phase", "7B width at --layers 2: ~6 min (docs/SCALE.md); the 32 layers need an idle "
                 "machine and 13 GB of disk"),
    "gpu": ("the GPU check (docs/GPU.md): attention, a Llama-2-7B LoRA step, MCQA scoring, decode and the "
            "Mixtral MoE layer vs cuDNN / transformers; --dry-run runs every part tiny on CPU",
            "at most 8 min on one H100 (its budgets); the dry run ~4 min"),
    "moe": ("forward+backward time of one Mixtral MoE layer: grouped matmul, ragged_dot, the whole "
            "layer and transformers' block, vs dense matmuls of the same active work",
            "~6.5 min"),
    "peers": ("medjax vs the JAX peers EasyDeL and levanter (own venvs, `make peers-venv`) on "
              "SmolLM2-135M: CPU tokens/s, first-step time, peak RSS and first-step loss of a full "
              "and a LoRA step; --tpu v5p-8: libtpu compile-only peak memory, FLOPs, optimal_seconds "
              "of a Llama-2-7B step", "see docs/PERFORMANCE.md (one process per side and run)"),
    "serve": ("python -m medjax.serve vs transformers' continuous batching on SmolLM2-135M under the same "
              "client load: output tokens/s, p50/p99 time to first token and per token at 1, 8, 32 "
              "clients", "~5.5 min with --requests 1 --max-tokens 16 (docs/SERVE.md); the defaults, four times the tokens, were not timed"),
    "train": ("tokens/s, MFU and peak memory of a LoRA step and a full step vs transformers + PEFT "
              "on SmolLM2-135M", "~16.5 min (990 s): each side in its own process"),
    "train_profile": ("where the train step's time goes: per-op shares from jax.profiler (medjax) and "
                      "torch.profiler (transformers + PEFT), same model and shapes",
                      "a few minutes: one profiled step per side"),
}
# Left out of the run of every benchmark (no NAME): they need another machine or a long, idle one.
NOT_IN_DEFAULT_RUN = {"fullsize": "45+ min and 13 GB of disk at 32 layers", "gpu": "needs a lent GPU",
                      "peers": "needs the peer venvs (`make peers-venv`)"}


def available() -> list[str]:
    """Benchmark names: the modules of ``medjax.bench``."""
    return sorted(m.name for m in pkgutil.iter_modules(medjax.bench.__path__)
                  if not m.name.startswith("_"))


def _usage() -> str:
    lines = ["usage: python -m medjax.bench {" + ",".join(available()) + "} [options]",
             "       python -m medjax.bench NAME --help   (options of one benchmark)",
             "       python -m medjax.bench               (run every benchmark with defaults)", "",
             "benchmarks: what each measures; how long its defaults took (`/usr/bin/time python -m",
             "medjax.bench NAME`, 2-core AMD EPYC CPU shared with other jobs, 2026-12-06, unless noted):"]
    for name in available():
        what, how_long = BENCHMARKS.get(name, ("(not described)", "?"))
        lines += [f"  {name:13s} {what}", f"  {'':13s} time: {how_long}"]
    return "\n".join(lines)


def run(name: str, argv: list[str]) -> int:
    if name not in available():
        raise ConfigError(f"unknown benchmark {name!r}; available: {', '.join(available())}")
    module = importlib.import_module(f"medjax.bench.{name}")
    if not callable(getattr(module, "main", None)):
        raise ConfigError(f"medjax/bench/{name}.py defines no main(argv)")
    return int(module.main(argv) or 0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv:
        return run(argv[0], argv[1:])
    status = 0
    for name in available():
        if name in NOT_IN_DEFAULT_RUN:
            print(f"== medjax.bench {name}: skipped ({NOT_IN_DEFAULT_RUN[name]}; run it by name)", flush=True)
            continue
        print(f"== medjax.bench {name}", flush=True)
        status = max(status, run(name, []))
    return status


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
