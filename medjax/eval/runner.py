"""``evaluate``: tasks → items → batched scoring (or generation) → metrics."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from medjax.errors import CheckpointError, ConfigError
from medjax.eval import readers, report, truthfulqa
from medjax.eval.requests import LmEvalEncoder, build_items
from medjax.eval.scorer import Scorer
from medjax.eval.tasks import resolve


def chat_renderer(tokenizer, template: str | None = None) -> Callable[[list[dict]], str]:
    """``messages → prompt`` with the generation prompt, as lm-eval's HFLM.apply_chat_template
    (which retries without the system turn when the template rejects it)."""
    import jinja2


    def render(messages: list[dict]) -> str:
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 chat_template=template)
        except (CheckpointError, jinja2.TemplateError):
            if not any(m["role"] == "system" for m in messages):
                raise
            return render([m for m in messages if m["role"] != "system"])

    return render


def evaluate(model, tokenizer, tasks: str | list[str], data_dir, *, limit: int | None = None,
             num_fewshot: int = 0, chat_template: bool | str = False, fewshot_as_multiturn: bool = True,
             score: str = "letter", mode: str = "loglikelihood", tokens_per_batch: int = 4096,
             max_new_tokens: int = 32, log_samples: bool = False, max_length: int | None = None,
             fewshot_seed: int = 1234, truthfulqa_primer: str = "qa",
             contamination: dict[str, set[str]] | None = None) -> dict:
    """Evaluate ``model`` on medical MCQA tasks and TruthfulQA; returns the JSON-ready result dict.

    ``chat_template``: False (plain prompts), True (the tokenizer's template) or a template
    (jinja string or built-in name). ``score``: "letter" (lm-eval default) or "full_answer"
    (Med42: likelihood of the option text). ``mode``: "loglikelihood" or "generate" (greedy
    answer, then the first option letter in it). ``truthfulqa_primer``: "qa" (the release's
    six QA pairs before each TruthfulQA question) or "none" (the bare ``Q: ...\nA:``).
    ``contamination``: ``{task: dirty item ids}`` (``medjax.data.contamination.dirty_ids``) adds
    ``"contamination"``: the scores on all, clean and dirty items.
    """
    if score not in ("letter", "full_answer"):
        raise ValueError(f"score must be 'letter' or 'full_answer', got {score!r}")
    if mode not in ("loglikelihood", "generate"):
        raise ValueError(f"mode must be 'loglikelihood' or 'generate', got {mode!r}")
    if truthfulqa_primer not in truthfulqa.PRIMERS:
        raise ValueError(f"truthfulqa_primer must be one of {sorted(truthfulqa.PRIMERS)}, got {truthfulqa_primer!r}")
    task_list, groups = resolve(tasks)
    task_list = [replace(t, description=truthfulqa.PRIMERS[truthfulqa_primer]) if t.dataset == "truthfulqa"
                 else t for t in task_list]
    if mode == "generate" and any(t.dataset == "truthfulqa" for t in task_list):
        raise ConfigError("TruthfulQA tasks are scored by log-likelihood only (--mode loglikelihood)")
    chat = None
    if chat_template:
        chat = chat_renderer(tokenizer, None if chat_template is True else chat_template)
    max_length = max_length or model.config.max_position_embeddings
    encoder = LmEvalEncoder(tokenizer, max_length)
    cache: dict = {}
    items_by_task, build_s = {}, {}
    for task in task_list:
        docs = readers.load_docs(task, data_dir, cache)
        t0 = time.perf_counter()
        items_by_task[task.name] = build_items(task, docs, encoder, num_fewshot=num_fewshot, score=score,
                                               chat=chat, fewshot_as_multiturn=fewshot_as_multiturn,
                                               fewshot_seed=fewshot_seed, limit=limit)
        encoder.clear()
        build_s[task.name] = time.perf_counter() - t0
    all_items = [item for items in items_by_task.values() for item in items]
    t0 = time.perf_counter()
    if mode == "loglikelihood":
        # One pass over every task's requests: one length plan, one set of compiled shapes.
        Scorer(model, tokens_per_batch=tokens_per_batch, pad_id=tokenizer.pad_id).score(
            all_items, desc="+".join(items_by_task) if len(items_by_task) <= 2 else f"{len(items_by_task)} tasks")
    else:
        from medjax.eval.generate import answer_by_generation
        for name, items in items_by_task.items():
            answer_by_generation(model, tokenizer, items, max_new_tokens=max_new_tokens, desc=name)
    run_s = time.perf_counter() - t0
    timings = {"build_s": build_s, "run_s": run_s, "items_per_s": len(all_items) / max(run_s, 1e-9)}
    summary = report.summarize(items_by_task, {t.name: t.metrics for t in task_list}, groups)
    summary["config"] = dict(tasks=[t.name for t in task_list], limit=limit, num_fewshot=num_fewshot,
                             chat_template=bool(chat_template), fewshot_as_multiturn=fewshot_as_multiturn,
                             score=score, mode=mode, max_length=max_length,
                             truthfulqa_primer=truthfulqa_primer)
    summary["timings"] = timings
    if contamination is not None:
        summary["contamination"] = report.contamination_split(items_by_task, {t.name: t.metrics for t in task_list},
                                                              contamination)
    if log_samples:
        summary["samples"] = {name: report.samples(items) for name, items in items_by_task.items()}
    return summary
