"""One parser per benchmark file format, shared by medjax.eval's readers and the TFDS builders.

Each parser yields ``BenchmarkItem``s: ``id`` (the record's own id, else ``file:line``),
``question``, ``options``, ``label`` (0-based), ``subject`` (str or None), ``contexts``
(PubMedQA), ``where`` (``path:line`` for messages) and ``record`` (the raw record).

| benchmark | layouts |
|---|---|
| MedQA | medagents/official (question, options{A..D}, answer_idx letter); HF/lm-eval (sent1, ending0..3, label) |
| MedMCQA | mirror (question, choices ["A. text"..], answer 0-3); official/HF (opa..opd, cop: 1-4 in the official release, 0-3 in the HF export, detected per file) |
| MMLU | JSON lines (question, options{A..D}, answer_idx, subject); the official headerless CSVs |
| PubMedQA | the official ``ori_pqal.json`` with a {PMID: decision} mapping (``test_ground_truth.json``) |
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from medjax.data.jsonl import iter_lines, read_record
from medjax.errors import DataError

LETTERS = "ABCDEFGHIJ"
PUBMEDQA_CHOICES = ("yes", "no", "maybe")


class BenchmarkItem(NamedTuple):
    id: str
    question: str
    options: list[str]
    label: int
    subject: str | None
    contexts: list[str]
    where: str
    record: Any


def _require(record: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise DataError(f"{where}: item is missing field(s) {missing}; has {sorted(record)}")


def _records(path: Path) -> Iterator[tuple[dict, str, str]]:
    """(record, where, default id) of a JSON-lines file, or of a JSON array (``path:item i``)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":
            try:
                array = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            for i, record in enumerate(array):
                yield record, f"{path}:item {i}", f"{path.name}:item {i}"
            return
    for line_no, offset, raw in iter_lines(path):
        yield read_record(path, line_no, offset, raw), f"{path}:{line_no}", f"{path.name}:{line_no}"


def letter_index(value, n: int, where: str, field: str) -> int:
    """An answer given as a letter (``"B"``) or a 0-based index → the index."""
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n]:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    raise DataError(f"{where}: field {field!r} = {value!r} is not an answer letter/index")


def _id(record: dict, key: str, default: str) -> str:
    return str(record[key]) if record.get(key) is not None else default


def medqa(path: Path) -> Iterator[BenchmarkItem]:
    for rec, where, default_id in _records(path):
        if "sent1" in rec:
            _require(rec, ("sent1", "ending0", "ending1", "ending2", "ending3", "label"), where)
            options = [rec[f"ending{i}"] for i in range(4)]
            yield BenchmarkItem(_id(rec, "id", default_id), rec["sent1"], options,
                                letter_index(rec["label"], 4, where, "label"), None, [], where, rec)
            continue
        _require(rec, ("question", "options", "answer_idx"), where)
        options = [rec["options"][k] for k in sorted(rec["options"])]
        yield BenchmarkItem(_id(rec, "realidx", default_id), rec["question"], options,
                            letter_index(rec["answer_idx"], len(options), where, "answer_idx"),
                            rec.get("meta_info"), [], where, rec)


def medmcqa(path: Path) -> Iterator[BenchmarkItem]:
    rows = list(_records(path))
    # The official release numbers the correct option 1..4; the HF export uses 0..3.
    cops = {rec.get("cop") for rec, _, _ in rows if "opa" in rec}
    one_based = 0 not in cops and 4 in cops
    for rec, where, default_id in rows:
        if "opa" in rec:
            _require(rec, ("question", "opa", "opb", "opc", "opd", "cop"), where)
            options = [rec[k] for k in ("opa", "opb", "opc", "opd")]
            cop = rec["cop"] - 1 if one_based and isinstance(rec["cop"], int) else rec["cop"]
            yield BenchmarkItem(_id(rec, "id", default_id), rec["question"], options,
                                letter_index(cop, 4, where, "cop"), rec.get("subject_name"), [], where, rec)
            continue
        _require(rec, ("question", "choices", "answer"), where)
        options = []
        for i, choice in enumerate(rec["choices"]):
            if not choice.startswith(f"{LETTERS[i]}. "):
                raise DataError(f"{where}: choice {i} {choice[:20]!r} does not start with '{LETTERS[i]}. '")
            options.append(choice[3:])
        yield BenchmarkItem(_id(rec, "id", default_id), rec["question"], options,
                            letter_index(rec["answer"], len(options), where, "answer"),
                            rec.get("subject_name"), [], where, rec)


def mmlu_jsonl(path: Path) -> Iterator[BenchmarkItem]:
    for rec, where, default_id in _records(path):
        _require(rec, ("question", "options", "answer_idx", "subject"), where)
        options = [rec["options"][k] for k in sorted(rec["options"])]
        yield BenchmarkItem(_id(rec, "realidx", default_id), rec["question"], options,
                            letter_index(rec["answer_idx"], len(options), where, "answer_idx"),
                            rec["subject"], [], where, rec)


def mmlu_csv(path: Path, subject: str) -> Iterator[BenchmarkItem]:
    """The official headerless ``<subject>_<split>.csv``: question,A,B,C,D,answer-letter."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        line_no = 1
        for row in reader:
            where, default_id = f"{path}:{line_no}", f"{path.name}:{line_no}"
            line_no = reader.line_num + 1          # a quoted field may span lines
            if len(row) != 6:
                raise DataError(f"{where}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
            yield BenchmarkItem(default_id, row[0], row[1:5], letter_index(row[5], 4, where, "answer"),
                                subject, [], where, {"row": row})


def pubmedqa(pqal_path: Path, labels: dict[str, str], labels_file: Path | str) -> Iterator[BenchmarkItem]:
    """PQA-L items of ``labels`` ({PMID: yes/no/maybe}, in its order) from ``ori_pqal.json``."""
    pqal_path = Path(pqal_path)
    try:
        pqal = json.loads(pqal_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{pqal_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for pmid, decision in labels.items():
        where = f"{pqal_path}:key {pmid}"
        if pmid not in pqal:
            raise DataError(f"{labels_file}: PMID {pmid} has no entry in {pqal_path}")
        rec = pqal[pmid]
        _require(rec, ("QUESTION", "CONTEXTS"), where)
        if decision not in PUBMEDQA_CHOICES:
            raise DataError(f"{labels_file}:key {pmid}: label {decision!r} not in yes/no/maybe")
        yield BenchmarkItem(str(pmid), rec["QUESTION"], list(PUBMEDQA_CHOICES), PUBMEDQA_CHOICES.index(decision),
                            None, list(rec["CONTEXTS"]), where, {pmid: rec})


def pubmedqa_test(pqal_path: Path, truth_path: Path) -> Iterator[BenchmarkItem]:
    """The official test set: the PMIDs of ``test_ground_truth.json``, in file order."""
    truth_path = Path(truth_path)
    try:
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{truth_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    return pubmedqa(pqal_path, truth, truth_path)
