"""Metrics (acc, acc_norm as lm-eval computes them; TruthfulQA's MC1/MC2/MC3), size-weighted
groups, per-subject (per-category) breakdowns, JSON and Markdown."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from medjax.eval import truthfulqa
from medjax.eval.requests import Item
from medjax.outputs import write_file

METRIC_ORDER = ("acc", "acc_norm", *truthfulqa.METRICS)


def item_metrics(item: Item) -> dict:
    """lm_eval/api/task.py::process_results for multiple_choice: argmax of the summed log-probs;
    acc_norm divides them by each choice's length in characters (first maximum wins).
    TruthfulQA docs (``n_true``) get the release's MC1/MC2/MC3 instead."""
    if "n_true" in item.doc:
        return truthfulqa.item_metrics([r.loglikelihood for r in item.requests], item.doc)
    if item.generated_pred is not None:
        pred = item.generated_pred
        return {"pred": pred, "pred_norm": pred, "acc": float(pred == item.gold),
                "acc_norm": float(pred == item.gold)}
    lls = np.array([r.loglikelihood for r in item.requests], dtype=np.float64)
    lengths = np.array([float(len(c)) for c in item.choice_texts])
    pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == item.gold),
            "acc_norm": float(pred_norm == item.gold)}


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def summarize(items_by_task: dict[str, list[Item]], metrics_by_task: dict[str, tuple[str, ...]],
              groups: dict[str, tuple[str, ...]]) -> dict:
    """{"results": {task: {...}}, "groups": {...}, "subjects": {task: {subject: {...}}}}."""
    results, subjects = {}, {}
    for task, items in items_by_task.items():
        per_item = [item_metrics(it) for it in items]
        row = {"n": len(items)}
        for metric in metrics_by_task[task]:
            values = [m[metric] for m in per_item]
            row[metric] = sum(values) / max(len(values), 1)
            row[f"{metric}_stderr"] = _stderr(values)
        results[task] = row
        by_subject = defaultdict(list)
        for it, m in zip(items, per_item):
            if it.doc.get("subject"):
                by_subject[it.doc["subject"]].append(m)
        if len(by_subject) > 1:
            shown = [k for k in METRIC_ORDER if k in per_item[0]
                     and (k in metrics_by_task[task] or k == "acc_norm")]
            subjects[task] = {s: {"n": len(ms), **{k: sum(m[k] for m in ms) / len(ms) for k in shown}}
                              for s, ms in sorted(by_subject.items())}
    group_rows = {}
    for group, members in groups.items():
        present = [t for t in members if t in results]
        row = {"n": 0}
        # lm-eval aggregate_metric_list: acc, weight_by_size → item-weighted mean of members,
        # per metric over the members that report it (TruthfulQA: one member per metric, so
        # n is the items of the members behind one metric, not their sum).
        for metric in METRIC_ORDER:
            having = [t for t in present if metric in results[t]]
            n = sum(results[t]["n"] for t in having)
            if having and metric != "acc_norm":
                row[metric] = sum(results[t][metric] * results[t]["n"] for t in having) / max(n, 1)
                row["n"] = max(row["n"], n)
        group_rows[group] = row
    return {"results": results, "groups": group_rows, "subjects": subjects}


def contamination_split(items_by_task: dict[str, list[Item]], metrics_by_task: dict[str, tuple[str, ...]],
                        dirty: dict[str, set[str]]) -> dict:
    """``{task: {"all"|"clean"|"dirty": {"n", metric...}}}``: scores on every item and on the items
    a contamination report (``python -m medjax.data decontaminate``) found clean or overlapping.
    A task the report did not check gets ``{"all": ..., "unchecked": True}``."""
    out = {}
    for task, items in items_by_task.items():
        per_item = [item_metrics(it) for it in items]

        def score(keep):
            ms = [m for it, m in zip(items, per_item) if keep(it)]
            return {"n": len(ms), **{k: (sum(m[k] for m in ms) / len(ms) if ms else float("nan"))
                                     for k in metrics_by_task[task]}}

        if task not in dirty:
            out[task] = {"all": score(lambda it: True), "unchecked": True}
            continue
        ids = dirty[task]
        out[task] = {"all": score(lambda it: True), "clean": score(lambda it: it.doc.get("id") not in ids),
                     "dirty": score(lambda it: it.doc.get("id") in ids)}
    return out


def contamination_table(split: dict) -> str:
    """Markdown: per task and metric, the score on all, clean and dirty items side by side."""
    lines = ["| task | metric | all (n) | clean (n) | dirty (n) |", "|---|---|---:|---:|---:|"]

    def cell(row, metric):
        if row is None:
            return "not checked"
        return f"{100 * row[metric]:.2f} ({row['n']})" if row["n"] else "– (0)"

    for task, parts in split.items():
        for metric in [k for k in parts["all"] if k != "n"]:
            lines.append(f"| {task} | {metric} | {cell(parts['all'], metric)} | "
                         f"{cell(parts.get('clean'), metric)} | {cell(parts.get('dirty'), metric)} |")
    return "\n".join(lines)


def samples(items: list[Item]) -> list[dict]:
    """Per-item log (``--log-samples``): prompt, choices, per-choice log-likelihoods, predictions."""
    out = []
    for it in items:
        m = item_metrics(it)
        out.append({"doc_id": it.index, "source": it.doc.get("_where"), "subject": it.doc.get("subject"),
                    "context": it.context, "continuations": it.continuations, "gold": it.gold,
                    "loglikelihoods": [r.loglikelihood for r in it.requests],
                    "is_greedy": [r.is_greedy for r in it.requests],
                    "context_tokens": [len(r.context_tokens) for r in it.requests],
                    "continuation_tokens": [list(r.continuation_tokens) for r in it.requests],
                    **({"generation": it.generation} if it.generation is not None else {}), **m})
    return out


def markdown_table(summary: dict) -> str:
    """One row per task (± stderr), its subjects/categories, then the groups; a column per
    metric any row reports, in METRIC_ORDER (acc, acc_norm for MCQA; mc1..mc3 for TruthfulQA)."""
    rows = [*summary["results"].values(), *summary["groups"].values()]
    columns = [k for k in METRIC_ORDER if any(k in r for r in rows)]
    lines = ["| task | n | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]

    def cell(row, key, stderr=False):
        if key not in row:
            return ""
        err = row.get(f"{key}_stderr")
        return f"{100 * row[key]:.2f}" + (f" ± {100 * err:.2f}" if stderr and err is not None else "")

    def line(name, row, stderr=False):
        return f"| {name} | {row['n']} | " + " | ".join(cell(row, k, stderr) for k in columns) + " |"

    for task, row in summary["results"].items():
        lines.append(line(task, row, stderr=True))
        for subject, srow in summary.get("subjects", {}).get(task, {}).items():
            lines.append(line(f"&nbsp;&nbsp;{task}/{subject}", srow))
    for group, row in summary["groups"].items():
        lines.append(line(f"**{group}**", row))
    return "\n".join(lines)


def write_json(path: str | Path, data: dict) -> None:
    """Atomic write (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, json.dumps(data, indent=2, ensure_ascii=False, default=float))
