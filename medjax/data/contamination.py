"""A run's contamination report: the test sets of eval tasks against its training sources.

``report(...)`` builds the index of the tasks' test items (read by medjax.eval's readers),
scans the run's sources (``decontaminate.scan_sources``) and returns the JSON-ready report;
``markdown`` renders it; ``dirty_ids`` reads one back for ``python -m medjax.eval --contamination``;
``overlapping_rows`` is what ``data.decontaminate`` drops before training.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from medjax.errors import ConfigError, DataError

from medjax.data import decontaminate as dc
from medjax.data import decontaminate_scan as scan

FORMAT = "medjax-contamination-1"
MARKDOWN_ITEMS = 30


def test_items(task_names, data_dir) -> list[tuple[str, str, str, list[str]]]:
    """(task, item id, file:line, texts) of every test item of ``task_names`` (groups expanded)."""
    from medjax.eval import readers
    from medjax.eval.tasks import resolve

    if data_dir is None:
        raise ConfigError("eval.data_dir is not set: give the directory with the benchmark test files "
                          "(e.g. eval.data_dir=../shared/data/benchmarks)")
    tasks, _ = resolve(list(task_names))
    items, cache = [], {}
    for task in tasks:
        try:
            docs = readers.load_docs(task, data_dir, cache)
        except DataError as e:
            raise DataError(f"task {task.name}: {e}") from None
        items += [(task.name, str(d.get("id") or d["_where"]), d["_where"], dc.item_pieces(d)) for d in docs]
    return items


def report(data_cfg, task_names, data_dir, *, n: int = 13, workers: int | None = None) -> dict:
    dc.check_n(n)
    t0 = time.perf_counter()
    index = dc.BenchmarkIndex.build(test_items(task_names, data_dir), n)
    chunks = scan.plan_chunks(scan.source_entries(data_cfg))
    index_s, t1 = time.perf_counter() - t0, time.perf_counter()
    scanned = scan.scan_sources(index, chunks, workers=workers, on_error=data_cfg.on_error)
    scan_s = time.perf_counter() - t1
    by_item: dict[int, list] = {}
    for result in scanned.values():
        for m in result["matches"]:
            by_item.setdefault(m.item, []).append(m)
    tasks = {}
    for i, item in enumerate(index.items):
        row = tasks.setdefault(item.task, {"items": 0, "checked": 0, "overlapping": 0, "flagged": []})
        row["items"] += 1
        row["checked"] += int(index.checkable[i])
        if i in by_item:
            matches = sorted(by_item[i], key=lambda m: -m.span_tokens)
            row["overlapping"] += 1
            row["flagged"].append({"id": item.id, "where": item.where,
                                   "longest_span_tokens": matches[0].span_tokens, "longest_span": matches[0].span,
                                   "rows": [{"row": m.row, "span_tokens": m.span_tokens} for m in matches]})
    for row in tasks.values():
        row["share"] = row["overlapping"] / row["checked"] if row["checked"] else 0.0
    sources = {}
    for name, result in scanned.items():
        rows = sorted({m.row for m in result["matches"]}, key=_row_order)
        sources[name] = {"rows": result["rows"], "bytes": result["bytes"], "overlapping": len(rows),
                         "overlapping_rows": rows}
    total_bytes = sum(s["bytes"] for s in sources.values())
    return {"format": FORMAT, "n": n, "data_dir": str(data_dir), "tasks": tasks, "sources": sources,
            "scan": {"index_s": index_s, "scan_s": scan_s, "bytes": total_bytes,
                     "workers": min(workers or os.cpu_count() or 1, len(chunks)),
                     "mb_per_s": total_bytes / 1e6 / max(scan_s, 1e-9), "test_ngrams": int(len(index.hashes)),
                     "common_ngrams_left_out": index.common}}


def _row_order(where: str):
    path, _, line = where.rpartition(":")
    return (path, int(line)) if line.isdigit() else (where, 0)


def markdown(rep: dict) -> str:
    lines = [f"# Benchmark contamination ({rep['n']}-gram overlap)", "",
             f"Test sets from {rep['data_dir']}; {rep['scan']['common_ngrams_left_out']} n-grams shared by "
             f"{dc.COMMON_ITEMS}+ items of one task (question stems) left out.", "",
             "| task | items | checked | with overlap | share |", "|---|---:|---:|---:|---:|"]
    for task, row in rep["tasks"].items():
        lines.append(f"| {task} | {row['items']} | {row['checked']} | {row['overlapping']} | "
                     f"{100 * row['share']:.2f}% |")
    lines += ["", "| training source | rows | MB | overlapping rows |", "|---|---:|---:|---:|"]
    for name, src in rep["sources"].items():
        lines.append(f"| {name} | {src['rows']} | {src['bytes'] / 1e6:.2f} | {src['overlapping']} |")
    for task, row in rep["tasks"].items():
        if not row["flagged"]:
            continue
        lines += ["", f"## {task}: flagged items", "", "| test item | training row | longest shared span |",
                  "|---|---|---|"]
        for item in row["flagged"][:MARKDOWN_ITEMS]:
            rows = ", ".join(r["row"] for r in item["rows"][:3]) + (" ..." if len(item["rows"]) > 3 else "")
            span = item["longest_span"].replace("|", "\\|")
            lines.append(f"| {item['id']} | {rows} | {item['longest_span_tokens']} tokens: {span[:160]} |")
        if len(row["flagged"]) > MARKDOWN_ITEMS:
            lines.append(f"\n({len(row['flagged']) - MARKDOWN_ITEMS} more in report.json)")
    return "\n".join(lines) + "\n"


def dirty_ids(path) -> dict[str, set[str]]:
    """``{task: ids of test items with overlap}`` from a report.json written by ``decontaminate``."""
    path = Path(path)
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"--contamination {path}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"--contamination {path}: not a JSON file ({e})") from None
    if not isinstance(rep, dict) or rep.get("format") != FORMAT:
        raise DataError(f"--contamination {path}: not a report of python -m medjax.data decontaminate "
                        f"(no \"format\": \"{FORMAT}\")")
    return {task: {item["id"] for item in row["flagged"]} for task, row in rep["tasks"].items()}


_DROPPED: dict = {}


def overlapping_rows(data_cfg, data_dir) -> set[str]:
    """Rows (file:line) of the run's sources that share an n-gram with ``data.decontaminate``'s
    tasks; computed once per process, logged (per file) when first computed."""
    key = repr((data_cfg.decontaminate, data_cfg.decontaminate_n, str(data_dir), data_cfg.train, data_cfg.sources))
    if key not in _DROPPED:
        rep = report(data_cfg, data_cfg.decontaminate, data_dir, n=data_cfg.decontaminate_n)
        rows = {r for src in rep["sources"].values() for r in src["overlapping_rows"]}
        per_file: dict[str, int] = {}
        for r in rows:
            per_file[r.rpartition(":")[0]] = per_file.get(r.rpartition(":")[0], 0) + 1
        detail = ", ".join(f"{count} from {f}" for f, count in sorted(per_file.items())) or "none"
        print(f"data.decontaminate ({','.join(data_cfg.decontaminate)}, {data_cfg.decontaminate_n}-grams): "
              f"dropped {len(rows)} training row(s): {detail}", file=sys.stderr)
        _DROPPED[key] = rows
    return _DROPPED[key]
