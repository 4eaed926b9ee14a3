"""A run config's ``eval`` section on a model: what ``python -m medjax.train`` scores after (and,
with ``eval.before_training``, before) training."""
from __future__ import annotations

import json
from pathlib import Path

from medjax.outputs import write_file


def evaluate_section(eval_cfg, model_fn, tokenizer, out_path) -> dict | None:
    """Score ``eval_cfg.tasks`` on ``model_fn()`` (called only when something will be scored: a
    plain model, adapters merged); writes the full result to ``out_path``. None when no tasks;
    a ``skipped`` note when ``eval.data_dir`` is missing, there is no tokenizer, or no task's
    data is present."""
    if not eval_cfg.tasks or not eval_cfg.data_dir:
        return None
    data_dir = Path(eval_cfg.data_dir).expanduser()
    if not data_dir.is_dir():
        return {"skipped": f"eval.data_dir {data_dir} not found"}
    if tokenizer is None:
        return {"skipped": "no tokenizer"}
    from medjax.eval import readers
    from medjax.eval.runner import evaluate
    from medjax.eval.tasks import resolve
    tasks, skipped = [], {}
    for task in resolve(list(eval_cfg.tasks))[0]:      # the card lists tasks whose data may be absent
        try:
            readers.load_docs(task, data_dir)
            tasks.append(task.name)
        except readers.DataError as e:
            skipped[task.name] = str(e)
    if not tasks:
        return {"skipped": skipped}
    template = eval_cfg.chat_template
    result = evaluate(model_fn(), tokenizer, tasks, data_dir, limit=eval_cfg.limit,
                      num_fewshot=eval_cfg.num_fewshot,
                      chat_template=True if template == "default" else (template or False),
                      fewshot_as_multiturn=eval_cfg.fewshot_as_multiturn, score=eval_cfg.score,
                      mode=eval_cfg.mode, tokens_per_batch=eval_cfg.batch_tokens,
                      max_new_tokens=eval_cfg.max_new_tokens, log_samples=eval_cfg.log_samples,
                      truthfulqa_primer=eval_cfg.truthfulqa_primer)
    result["skipped_tasks"] = skipped
    path = Path(out_path)
    from medjax.distributed import is_main_process
    if is_main_process():       # every process holds the same scores; one writes them
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, json.dumps(result, indent=2, default=str) + "\n")
    return {"results": result.get("results"), "skipped_tasks": skipped, "file": str(path)}
