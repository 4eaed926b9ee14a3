"""Read benchmark files from ``--data-dir`` into canonical docs.

Canonical doc: ``question`` (str), ``options`` (list of option texts), ``label`` (gold
index), ``subject`` (str or None), ``contexts`` (PubMedQA only), ``_where`` ("file:line",
for error messages and logged samples) and ``_key`` (the raw record, used like lm-eval's
dict equality when a few-shot sampler removes the evaluated doc).

Accepted layouts (first file found wins; see ../shared/data/benchmarks/README.md):
- MedQA: ``medqa_usmle_4options_test.jsonl`` (question, options{A..D}, answer_idx) or the
  HF/lm-eval layout (sent1, ending0..3, label).
- MedMCQA: ``medmcqa_validation.jsonl`` (question, choices ["A. text",..], answer 0-3) or
  the official/HF layout (question, opa..opd, cop, subject_name).
- MMLU: ``mmlu_medical_test.jsonl`` (question, options, answer_idx, subject) or the official
  CSVs ``test/<subject>_test.csv``.
- PubMedQA: the official ``ori_pqal.json`` + ``test_ground_truth.json``.
- TruthfulQA: the original release's ``TruthfulQA.csv`` (docs as ``truthfulqa.py`` describes).
- A TFDS dataset prepared by medjax.data under ``DIR/<tfds name>`` when no file is found.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from medjax.data import benchmark_files
from medjax.errors import DataError

from medjax.eval import truthfulqa
from medjax.eval.tasks import Task


OFFICIAL_SOURCES = {
    "medqa": "MedQA (Jin et al. 2020), US 4-option test split: "
             "data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl from "
             "https://github.com/jind11/MedQA (or medagents-benchmark's MedQA test.jsonl)",
    "medmcqa": "MedMCQA validation split: dev.json from https://github.com/medmcqa/medmcqa "
               "(or the HF dataset openlifescienceai/medmcqa, split validation, as JSON lines)",
    "mmlu": "MMLU test split (Hendrycks et al.): data/test/<subject>_test.csv from "
            "https://people.eecs.berkeley.edu/~hendrycks/data.tar",
    "pubmedqa": "PubMedQA labelled set: data/ori_pqal.json and data/test_ground_truth.json "
                "from https://github.com/pubmedqa/pubmedqa",
    "truthfulqa": "TruthfulQA's original release: TruthfulQA.csv from "
                  "https://github.com/sylinrl/TruthfulQA",
}

FILE_CANDIDATES = {
    "medqa": ("medqa_usmle_4options_test.jsonl", "medqa_4options_test.jsonl",
              "phrases_no_exclude_test.jsonl"),
    "medmcqa": ("medmcqa_validation.jsonl", "medmcqa_dev.jsonl", "dev.json"),
    "mmlu": ("mmlu_medical_test.jsonl",),
    "pubmedqa": ("ori_pqal.json",),
    "truthfulqa": ("TruthfulQA.csv",),
}

TFDS_NAMES = {"medqa": "medqa", "medmcqa": "medmcqa", "mmlu": "mmlu_medical", "pubmedqa": "pubmedqa"}


def _require(record: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise DataError(f"{where}: item is missing field(s) {missing}; has {sorted(record)}")


def _doc(question, options, label, subject, where, record, **extra) -> dict:
    if "contexts" not in extra and len(options) != 4:  # MedQA-4, MedMCQA and MMLU have A-D
        raise DataError(f"{where}: item has {len(options)} options, expected 4 (A-D)")
    return {"question": question, "options": list(options), "label": label, "subject": subject,
            "_where": where, "_key": json.dumps(record, sort_keys=True), **extra}


def _docs(items, with_contexts: bool = False) -> list[dict]:
    """Canonical docs from benchmark_files items (the one parser of each file format)."""
    return [_doc(it.question, it.options, it.label, it.subject, it.where, it.record, id=it.id,
                 **({"contexts": it.contexts} if with_contexts else {})) for it in items]


def read_medqa(path: Path) -> list[dict]:
    return _docs(benchmark_files.medqa(path))


def read_medmcqa(path: Path) -> list[dict]:
    return _docs(benchmark_files.medmcqa(path))


def read_mmlu_jsonl(path: Path) -> list[dict]:
    return _docs(benchmark_files.mmlu_jsonl(path))


def read_mmlu_csv(path: Path, subject: str) -> list[dict]:
    return _docs(benchmark_files.mmlu_csv(path, subject))


def read_pubmedqa(pqal_path: Path, truth_path: Path) -> list[dict]:
    """Official release: the test set is the PMIDs of test_ground_truth.json, in file order."""
    return _docs(benchmark_files.pubmedqa_test(pqal_path, truth_path), with_contexts=True)


TRUTHFULQA_COLUMNS = ("Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def read_truthfulqa(path: Path) -> list[dict]:
    """The release's CSV → docs: ``options`` = correct answers then incorrect ones (each
    closed with a period), ``n_true``, ``label`` = the best answer's index among the correct
    ones, ``subject`` = the category."""
    docs = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TRUTHFULQA_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DataError(f"{path}:1: header lacks column(s) {missing}; has {reader.fieldnames}")
        line_no = reader.line_num + 1
        for row in reader:
            where = f"{path}:{line_no}"            # the line where this (maybe multi-line) row starts
            line_no = reader.line_num + 1
            absent = [c for c in TRUTHFULQA_COLUMNS if row.get(c) is None]
            if absent:
                raise DataError(f"{where}: row lacks column(s) {absent} (fewer fields than the header)")
            true = truthfulqa.split_answers(row["Correct Answers"])
            false = truthfulqa.split_answers(row["Incorrect Answers"])
            best = truthfulqa.close_answer(row["Best Answer"])
            for column, value in (("Question", row["Question"].strip()), ("Best Answer", best),
                                  ("Correct Answers", true), ("Incorrect Answers", false)):
                if not value:
                    raise DataError(f"{where}: column {column!r} is empty")
            if best not in true:
                raise DataError(f"{where}: the best answer {best!r} is not among the correct answers")
            docs.append({"question": row["Question"], "options": true + false, "n_true": len(true),
                         "label": true.index(best), "subject": row["Category"].strip() or None,
                         "id": f"{path.name}:{where.rsplit(':', 1)[1]}", "_where": where,
                         "_key": json.dumps(row, sort_keys=True)})
    return docs


def _missing(dataset: str, data_dir: Path, tried: list[Path]) -> DataError:
    return DataError(
        f"no {dataset} data in {data_dir}: expected one of {[str(p) for p in tried]}. "
        f"Official source: {OFFICIAL_SOURCES[dataset]}")


def _read_tfds(dataset: str, data_dir: Path) -> list[dict] | None:
    """Docs from a TFDS dataset written by medjax.data's builders, if one is prepared there."""
    name = TFDS_NAMES.get(dataset)
    if name is None or not (data_dir / name).is_dir():
        return None
    from medjax.data import tfds_builders  # registers the builders; imports tfds lazily

    source = tfds_builders.data_source(name, split="test", data_dir=str(data_dir))
    docs = []
    for i in range(len(source)):
        rec = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in source[i].items()}
        where = f"{data_dir / name}:record {i}"
        _require(rec, ("question", "options", "label"), where)
        options = [o.decode() if isinstance(o, bytes) else str(o) for o in rec["options"]]
        contexts = [c.decode() if isinstance(c, bytes) else str(c) for c in rec.get("contexts", [])]
        extra = {"contexts": contexts} if dataset == "pubmedqa" else {}
        docs.append(_doc(rec["question"], options, int(rec["label"]), rec.get("subject") or None,
                         where, {"tfds": i}, id=str(rec.get("id", "")), **extra))
    return docs


def read_dataset(dataset: str, data_dir: str | Path, subject: str | None = None) -> list[dict]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a directory")
    tried = []
    if dataset == "pubmedqa":
        pqal, truth = data_dir / "ori_pqal.json", data_dir / "test_ground_truth.json"
        if pqal.is_file() and truth.is_file():
            return read_pubmedqa(pqal, truth)
        tried += [pqal, truth]
    elif dataset == "mmlu" and subject and (data_dir / "test" / f"{subject}_test.csv").is_file():
        return read_mmlu_csv(data_dir / "test" / f"{subject}_test.csv", subject)
    else:
        reader = {"medqa": read_medqa, "medmcqa": read_medmcqa, "mmlu": read_mmlu_jsonl,
                  "truthfulqa": read_truthfulqa}[dataset]
        for name in FILE_CANDIDATES[dataset]:
            if (data_dir / name).is_file():
                return reader(data_dir / name)
            tried.append(data_dir / name)
        if dataset == "mmlu":
            tried.append(data_dir / "test" / f"{subject}_test.csv")
    docs = _read_tfds(dataset, data_dir)
    if docs is not None:
        return docs
    raise _missing(dataset, data_dir, tried)


def load_docs(task: Task, data_dir: str | Path, cache: dict | None = None) -> list[dict]:
    """All docs of ``task`` (its subject(s) only, for MMLU and TruthfulQA subsets), in file order."""
    cache = {} if cache is None else cache
    key = (task.dataset, task.subject if task.dataset == "mmlu" else None)
    if key not in cache:
        cache[key] = read_dataset(task.dataset, data_dir, subject=task.subject)
    docs = cache[key]
    if task.subject is not None:
        docs = [d for d in docs if d["subject"] == task.subject]
    if task.subjects:
        docs = [d for d in docs if d["subject"] in task.subjects]
    return docs
