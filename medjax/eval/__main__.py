"""``python -m medjax.eval``: medical MCQA benchmarks with lm-evaluation-harness 0.4.13 scoring,
and TruthfulQA multiple choice (MC1/MC2/MC3) as its original release scores it.

    python -m medjax.eval --model PATH --tasks medqa_4options,medmcqa,pubmedqa,mmlu_medical \\
        --data-dir ../shared/data/benchmarks [--limit N] [--output results.json]
    python -m medjax.eval --model PATH --tasks truthfulqa_orig_medical --data-dir ../shared/data/benchmarks

--dtype auto (default) follows lm-eval's dtype=auto: an HF directory computes in config.json's
dtype/torch_dtype, a GGUF file in bfloat16 when quantized (else its own float type), a run
checkpoint in its run's model.dtype.

Trailing ``mesh.key=value`` flags lay the model out on a device mesh (``mesh.preset=fsdp``:
each device holds 1/N of every matrix); the weights load straight into it. ``mesh.stage=S``
splits the layers into S pipeline stages (a run trained with stages is scored on its own mesh,
so with them): each device holds its stage's layers only, and every batch runs through the
pipeline as S micro-batches (docs/SCALE.md#pipeline-parallelism-meshstage). Under
``launch/local_multiprocess.sh -n 2 -d 4 -- python -m medjax.eval ...`` the mesh spans both
processes: every process builds the same batches, each feeds its devices' rows, and the scores
come back to all; process 0 prints and writes ``--output``.
"""
from __future__ import annotations

import argparse
import sys
import time

from medjax.config import EvalSection
from medjax.eval import readers, truthfulqa
from medjax.eval.auto_dtype import DTYPES
from medjax.errors import ConfigError
from medjax.eval.tasks import ALIASES, valid_names


def build_parser() -> argparse.ArgumentParser:
    d = EvalSection()
    p = argparse.ArgumentParser(prog="python -m medjax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model directory (safetensors), .gguf file (pkg://... allowed) "
                                   "or a training run's directory / checkpoints directory")
    p.add_argument("--tasks", default="multimedqa",
                   help=f"comma-separated tasks/groups (default multimedqa): {', '.join(valid_names())}; "
                        f"aliases: {', '.join(f'{a} = {t}' for a, t in sorted(ALIASES.items()))}")
    p.add_argument("--data-dir", default=d.data_dir,
                   help="directory with the benchmark files (layouts: docs/EVAL.md)")
    p.add_argument("--limit", type=int, default=d.limit, help="score only the first N items of each task")
    p.add_argument("--num-fewshot", type=int, default=d.num_fewshot,
                   help="k-shot examples drawn from the evaluated split as lm-eval does (default 0)")
    p.add_argument("--chat-template", nargs="?", const="default", default=d.chat_template,
                   metavar="TEMPLATE",
                   help="wrap prompts in a chat template: the model's own (no value), a built-in "
                        "name (chatml, llama3, llama2, mistral, alpaca) or a jinja string; the "
                        "answer delimiter becomes '' as in lm-eval --apply_chat_template")
    p.add_argument("--no-fewshot-as-multiturn", dest="fewshot_as_multiturn", action="store_false",
                   default=d.fewshot_as_multiturn,
                   help="with --chat-template, put all few-shot examples in one user turn")
    p.add_argument("--score", choices=("letter", "full_answer"), default=d.score,
                   help="letter: log-likelihood of ' A'..' D' (lm-eval); full_answer: of the option "
                        "text (Med42)")
    p.add_argument("--mode", choices=("loglikelihood", "generate"), default=d.mode,
                   help="generate: greedy answer, then the first option letter named in it")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="answer length in --mode generate (default %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens,
                   help="padded tokens per scoring batch (default %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="compute and weight dtype; auto (default) = lm-eval's dtype=auto: the "
                        "checkpoint's own (see above)")
    p.add_argument("--truthfulqa-primer", choices=sorted(truthfulqa.PRIMERS), default=d.truthfulqa_primer,
                   help="qa: the release's six QA pairs before each TruthfulQA question (default); "
                        "none: the bare 'Q: <question>\\nA:'")
    p.add_argument("--output", help="write results (and samples) to this JSON file")
    p.add_argument("--log-samples", action="store_true", default=d.log_samples,
                   help="include per-item prompts and per-choice log-likelihoods in --output")
    p.add_argument("--contamination", metavar="REPORT_JSON",
                   help="report.json of python -m medjax.data decontaminate: also score the clean and "
                        "the overlapping (dirty) items of each task, side by side")
    p.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    p.add_argument("mesh", nargs="*", metavar="mesh.key=value",
                   help="device mesh, as in a run config: e.g. mesh.preset=fsdp mesh.fsdp=4 (default: "
                        "mesh.preset=dp, the weights on every device, the batch split over them; a run "
                        "checkpoint defaults to its run's mesh). Under launch/local_multiprocess.sh the "
                        "mesh spans every process's devices")
    return p


def _load(path: str, requested: str, mesh_flags=()):
    """``(model, tokenizer, dtype, why)`` through ``medjax.load``: a run in its run's
    ``model.dtype`` (ConfigError for another ``--dtype``), HF / GGUF in ``--dtype`` or, for
    ``auto``, lm-eval's choice (``auto_dtype``), read straight into the mesh ``mesh_flags``
    describe (each process reading only the blocks its devices hold), in the scan layout."""
    import jax.numpy as jnp

    from medjax.config import mesh_overrides
    from medjax.eval.auto_dtype import auto_dtype
    from medjax.loading import load_run, run_checkpoints
    from medjax.paths import resolve_path
    from medjax.sharding import check_model, make_mesh, rules_of

    if run_checkpoints(path) is not None:
        run = load_run(path, mesh_overrides=mesh_flags)
        if requested not in ("auto", run.config.model.dtype):
            raise ConfigError(f"--dtype {requested}: the run checkpoint {run.checkpoint_dir} is rebuilt in "
                              f"its run's model.dtype={run.config.model.dtype}; use --dtype auto, or export "
                              f"it (python -m medjax.export) and evaluate the HF directory")
        return run.model, run.tokenizer, run.config.model.dtype, f"run model.dtype, step {run.step}"
    dtype, why = (requested, "--dtype") if requested != "auto" else auto_dtype(resolve_path(path))
    mesh_cfg = mesh_overrides(mesh_flags)
    from medjax.loading import load
    mesh = make_mesh(mesh_cfg)
    model, tokenizer = load(path, getattr(jnp, dtype), mesh=mesh, rules=rules_of(mesh_cfg),
                            scan_layers=True)
    check_model(model.config, dict(mesh.shape))
    model.pipeline_stages = mesh_cfg.stage     # mesh.stage > 1: scored through the pipeline
    return model, tokenizer, dtype, why


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_tasks:
        print("\n".join(valid_names()))
        print("\n".join(f"{alias} (alias of {task})" for alias, task in sorted(ALIASES.items())))
        return 0
    if not args.model or not args.data_dir:
        raise ConfigError("--model and --data-dir are required")
    from medjax.config import mesh_overrides
    mesh_cfg = mesh_overrides(args.mesh)
    EvalSection(limit=args.limit, num_fewshot=args.num_fewshot, score=args.score, mode=args.mode,
                batch_tokens=args.batch_tokens, max_new_tokens=args.max_new_tokens,
                truthfulqa_primer=args.truthfulqa_primer)           # ConfigError: one line, exit 2
    from medjax.eval.tasks import resolve
    task_list, _ = resolve(args.tasks)
    aliases = [n for n in dict.fromkeys(n.strip() for n in args.tasks.split(",")) if n in ALIASES]
    for task in task_list:  # fail on missing data before loading the model (DataError: exit 2)
        readers.load_docs(task, args.data_dir)
    dirty = None
    if args.contamination:
        from medjax.data.contamination import dirty_ids
        dirty = dirty_ids(args.contamination)

    from medjax.distributed import initialize, is_main_process
    initialize(mesh_cfg)   # under launch/*: jax.distributed from the environment; no-op alone
    for name in aliases if is_main_process() else ():
        print(f"task {name!r} is an alias of {ALIASES[name]!r}", file=sys.stderr)
    from medjax.eval import report
    from medjax.eval.runner import evaluate

    t0 = time.perf_counter()
    model, tokenizer, dtype, why = _load(args.model, args.dtype, args.mesh)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s; dtype {dtype} ({why})", file=sys.stderr)
    chat = False if args.chat_template is None else (True if args.chat_template == "default"
                                                     else args.chat_template)
    t0 = time.perf_counter()
    result = evaluate(model, tokenizer, args.tasks, args.data_dir, limit=args.limit,
                      num_fewshot=args.num_fewshot, chat_template=chat,
                      fewshot_as_multiturn=args.fewshot_as_multiturn, score=args.score,
                      mode=args.mode, tokens_per_batch=args.batch_tokens,
                      max_new_tokens=args.max_new_tokens, log_samples=args.log_samples,
                      truthfulqa_primer=args.truthfulqa_primer, contamination=dirty)
    result["config"].update(model=args.model, dtype=dtype, dtype_from=why)
    result["wall_s"] = time.perf_counter() - t0
    if not is_main_process():       # every process scored the same items; process 0 reports
        return 0
    print(report.markdown_table(result))
    if "contamination" in result:
        print(f"\ncontamination ({args.contamination}):\n" + report.contamination_table(result["contamination"]))
    print(f"\nwall time {result['wall_s']:.1f}s", file=sys.stderr)
    if args.output:
        report.write_json(args.output, result)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
