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

from medjax.errors import DataError

from medjax.eval import truthfulqa
from medjax.eval.tasks import LETTERS, Task


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


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            yield record, where


def _letter_index(value, n: int, where: str, field: str) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n]:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, int) and 0 <= value < n:
        return value
    raise DataError(f"{where}: field {field!r} = {value!r} is not an answer letter/index")


def _doc(question, options, label, subject, where, record, **extra) -> dict:
    if "contexts" not in extra and len(options) != 4:  # MedQA-4, MedMCQA and MMLU have A-D
        raise DataError(f"{where}: item has {len(options)} options, expected 4 (A-D)")
    return {"question": question, "options": list(options), "label": label, "subject": subject,
            "_where": where, "_key": json.dumps(record, sort_keys=True), **extra}


def read_medqa(path: Path) -> list[dict]:
    docs = []
    for rec, where in _jsonl(path):
        if "sent1" in rec:
            _require(rec, ("sent1", "ending0", "ending1", "ending2", "ending3", "label"), where)
            options = [rec[f"ending{i}"] for i in range(4)]
            docs.append(_doc(rec["sent1"], options, _letter_index(rec["label"], 4, where, "label"),
                             None, where, rec))
            continue
        _require(rec, ("question", "options", "answer_idx"), where)
        options = [rec["options"][k] for k in sorted(rec["options"])]
        step = rec.get("meta_info")
        docs.append(_doc(rec["question"], options,
                         _letter_index(rec["answer_idx"], len(options), where, "answer_idx"),
                         step, where, rec))
    return docs


def read_medmcqa(path: Path) -> list[dict]:
    rows = list(_jsonl(path)) if path.suffix == ".jsonl" else _json_lines_or_array(path)
    if rows and "cop" in rows[0][0]:
        # Official dev.json numbers the correct option 1..4; the HF export uses 0..3.
        cops = {r.get("cop") for r, _ in rows}
        one_based = 0 not in cops and 4 in cops
    docs = []
    for rec, where in rows:
        if "opa" in rec:
            _require(rec, ("question", "opa", "opb", "opc", "opd", "cop"), where)
            options = [rec[k] for k in ("opa", "opb", "opc", "opd")]
            cop = rec["cop"] - 1 if one_based else rec["cop"]
            docs.append(_doc(rec["question"], options, _letter_index(cop, 4, where, "cop"),
                             rec.get("subject_name"), where, rec))
            continue
        _require(rec, ("question", "choices", "answer"), where)
        options = []
        for i, choice in enumerate(rec["choices"]):
            if not choice.startswith(f"{LETTERS[i]}. "):
                raise DataError(f"{where}: choice {i} {choice[:20]!r} does not start with "
                                f"'{LETTERS[i]}. '")
            options.append(choice[3:])
        docs.append(_doc(rec["question"], options,
                         _letter_index(rec["answer"], len(options), where, "answer"),
                         rec.get("subject_name"), where, rec))
    return docs


def _json_lines_or_array(path: Path):
    text = path.read_text(encoding="utf-8").lstrip()
    if text.startswith("["):
        return [(rec, f"{path}:item {i}") for i, rec in enumerate(json.loads(text))]
    return list(_jsonl(path))


def read_mmlu_jsonl(path: Path) -> list[dict]:
    docs = []
    for rec, where in _jsonl(path):
        _require(rec, ("question", "options", "answer_idx", "subject"), where)
        options = [rec["options"][k] for k in sorted(rec["options"])]
        docs.append(_doc(rec["question"], options,
                         _letter_index(rec["answer_idx"], len(options), where, "answer_idx"),
                         rec["subject"], where, rec))
    return docs


def read_mmlu_csv(path: Path, subject: str) -> list[dict]:
    docs = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            where = f"{path}:{line_no}"
            if len(row) != 6:
                raise DataError(f"{where}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
            docs.append(_doc(row[0], row[1:5], _letter_index(row[5], 4, where, "answer"),
                             subject, where, {"row": row}))
    return docs


def read_pubmedqa(pqal_path: Path, truth_path: Path) -> list[dict]:
    """Official release: the test set is the PMIDs of test_ground_truth.json, in file order."""
    pqal = json.loads(pqal_path.read_text(encoding="utf-8"))
    truth = json.loads(truth_path.read_text(encoding="utf-8"))
    docs = []
    for pmid, decision in truth.items():
        where = f"{pqal_path}:key {pmid}"
        if pmid not in pqal:
            raise DataError(f"{truth_path}: PMID {pmid} has no entry in {pqal_path}")
        rec = pqal[pmid]
        _require(rec, ("QUESTION", "CONTEXTS"), where)
        if decision not in ("yes", "no", "maybe"):
            raise DataError(f"{truth_path}:key {pmid}: label {decision!r} not in yes/no/maybe")
        docs.append(_doc(rec["QUESTION"], ["yes", "no", "maybe"],
                         ["yes", "no", "maybe"].index(decision), None, where, {pmid: rec},
                         contexts=list(rec["CONTEXTS"])))
    return docs


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
                         "_where": where, "_key": json.dumps(row, sort_keys=True)})
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
                         where, {"tfds": i}, **extra))
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
