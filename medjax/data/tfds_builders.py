"""TFDS builders for the medical benchmarks, prepared from local copies of the official files.

Nothing is downloaded: each builder reads its files from the manual directory and writes
array_record shards, which TFDS (without TensorFlow) and grain read by random access. All four
share one schema, the one medjax.eval reads back:
``{id, question, options: [str], label: int (0-based), subject, contexts: [str]}``.

| builder | manual files (any of) | splits |
|---|---|---|
| ``medqa`` | ``*medqa*{train,dev,test}*.jsonl`` or ``phrases_no_exclude_{train,dev,test}.jsonl`` (MedQA-USMLE 4 options: question, options{A..D}, answer_idx) | train / validation / test |
| ``medmcqa`` | ``train.json``, ``dev.json``, ``test.json`` (official: opa..opd, cop 1-4) or ``*medmcqa*{split}*.jsonl`` (choices ["A. .."], answer 0-3) | train / validation / test |
| ``pubmedqa`` | ``ori_pqal.json`` + ``test_ground_truth.json`` (PQA-L) | test (the 500 ground-truth ids), train (the rest) |
| ``mmlu_medical`` | ``*mmlu*test*.jsonl`` with ``subject`` or MMLU CSVs ``{subject}_{split}.csv`` | test / validation / dev |
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from medjax.errors import DataError

MMLU_MEDICAL_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine",
                         "medical_genetics", "professional_medicine")
LETTERS = "ABCDEFGHIJ"
_SPLIT_WORDS = (("train", "train"), ("validation", "validation"), ("dev", "validation"), ("test", "test"))


def _features():
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "question": tfds.features.Text(),
        "options": tfds.features.Sequence(tfds.features.Text()),
        "label": tfds.features.Scalar(dtype=np.int32),
        "subject": tfds.features.Text(),
        "contexts": tfds.features.Sequence(tfds.features.Text()),
    })


def _item(id_, question, options, label, subject="", contexts=()):
    return {"id": str(id_).rsplit("/", 1)[-1], "question": question, "options": list(options), "label": int(label),
            "subject": subject or "", "contexts": list(contexts)}


def _split_of(path: Path) -> str | None:
    name = path.stem.lower()
    for word, split in _SPLIT_WORDS:
        if word in name:
            return split
    return None


def _jsonl(path: Path):
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    yield f"{path}:{line_no}", json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataError(f"{path}:{line_no}: {e}") from None


def _need(record, keys, where):
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")


def _files_by_split(manual_dir: Path, patterns, dataset: str) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    paths = sorted({path for pattern in patterns for path in manual_dir.glob(pattern)})
    for path in paths:
        split = _split_of(path)
        if split is not None:
            found.setdefault(split, []).append(path)
    if not found:
        raise DataError(f"{dataset}: no files matching {list(patterns)} with train/dev/validation/test in "
                        f"the name under manual dir {manual_dir}")
    return found


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the official files in the manual directory (see medjax/data/tfds_builders.py)."

    def _info(self):
        return self.dataset_info_from_configs(features=_features(), supervised_keys=None)


class Medqa(_LocalBuilder):
    """MedQA (USMLE, 4 options)."""

    def _split_generators(self, dl_manager):
        files = _files_by_split(Path(dl_manager.manual_dir), ("*medqa*.jsonl", "phrases_no_exclude_*.jsonl"), "medqa")
        return {split: self._generate_examples(paths) for split, paths in files.items()}

    def _generate_examples(self, paths):
        for path in paths:
            for where, rec in _jsonl(path):
                _need(rec, ("question", "options", "answer_idx"), where)
                letters = sorted(rec["options"])
                if rec["answer_idx"] not in letters:
                    raise DataError(f"{where}: answer_idx {rec['answer_idx']!r} not in options {letters}")
                yield where, _item(rec.get("realidx", where), rec["question"],
                                   [rec["options"][k] for k in letters], letters.index(rec["answer_idx"]))


class Medmcqa(_LocalBuilder):
    """MedMCQA: official layout (opa..opd, 1-based cop) or the choices/answer mirror layout."""

    def _split_generators(self, dl_manager):
        files = _files_by_split(Path(dl_manager.manual_dir), ("*medmcqa*.json*", "train.json", "dev.json", "test.json"),
                                 "medmcqa")
        return {split: self._generate_examples(paths) for split, paths in files.items()}

    def _generate_examples(self, paths):
        for path in paths:
            for where, rec in _jsonl(path):
                if "opa" in rec:
                    _need(rec, ("question", "opa", "opb", "opc", "opd", "cop"), where)
                    options = [rec[k] for k in ("opa", "opb", "opc", "opd")]
                    label = int(rec["cop"]) - 1
                else:
                    _need(rec, ("question", "choices", "answer"), where)
                    options = [c[3:] if c[:3] in {f"{x}. " for x in LETTERS} else c for c in rec["choices"]]
                    label = int(rec["answer"])
                if not 0 <= label < len(options):
                    raise DataError(f"{where}: answer index {label} out of range for {len(options)} options")
                yield where, _item(rec.get("id", where), rec["question"], options, label,
                                   rec.get("subject_name") or "")


class Pubmedqa(_LocalBuilder):
    """PubMedQA PQA-L: yes/no/maybe with the abstract contexts."""

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        pqal, truth = manual / "ori_pqal.json", manual / "test_ground_truth.json"
        for path in (pqal, truth):
            if not path.is_file():
                raise DataError(f"pubmedqa: {path} not found (official PubMedQA data/ files)")
        questions = json.loads(pqal.read_text(encoding="utf-8"))
        test_ids = json.loads(truth.read_text(encoding="utf-8"))
        train = {k: v for k, v in questions.items() if k not in test_ids}
        splits = {"test": self._generate_examples(questions, test_ids, pqal)}
        if train:
            splits["train"] = self._generate_examples(train, {k: v["final_decision"] for k, v in train.items()
                                                              if "final_decision" in v}, pqal)
        return splits

    def _generate_examples(self, questions, labels, pqal):
        choices = ["yes", "no", "maybe"]
        for pmid, decision in labels.items():
            where = f"{pqal}:key {pmid}"
            if pmid not in questions:
                raise DataError(f"{where}: id from the ground truth file is missing")
            rec = questions[pmid]
            _need(rec, ("QUESTION", "CONTEXTS"), where)
            if decision not in choices:
                raise DataError(f"{where}: label {decision!r} is not yes/no/maybe")
            yield pmid, _item(pmid, rec["QUESTION"], choices, choices.index(decision), "", rec["CONTEXTS"])


class MmluMedical(_LocalBuilder):
    """MMLU restricted to its six medical subjects."""

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        files = {}
        for subject in MMLU_MEDICAL_SUBJECTS:  # official CSV layout: data/{split}/{subject}_{split}.csv
            for path in sorted(manual.rglob(f"{subject}_*.csv")):
                files.setdefault(_split_of(path) or "test", []).append((subject, path))
        for path in sorted(manual.glob("*mmlu*.jsonl")):
            if _split_of(path):
                files.setdefault(_split_of(path), []).append((None, path))
        if not files:
            raise DataError(f"mmlu_medical: no {{subject}}_test.csv or *test*.jsonl under {manual}")
        return {split: self._generate_examples(paths) for split, paths in files.items()}

    def _generate_examples(self, paths):
        for subject, path in paths:
            if subject is None:
                for where, rec in _jsonl(path):
                    _need(rec, ("question", "options", "answer_idx", "subject"), where)
                    if rec["subject"] not in MMLU_MEDICAL_SUBJECTS:
                        continue
                    letters = sorted(rec["options"])
                    yield where, _item(rec.get("realidx", where), rec["question"],
                                       [rec["options"][k] for k in letters], letters.index(rec["answer_idx"]),
                                       rec["subject"])
                continue
            with path.open(encoding="utf-8", newline="") as f:
                for line_no, row in enumerate(csv.reader(f), start=1):
                    where = f"{path}:{line_no}"
                    if len(row) != 6 or row[5] not in LETTERS[:4]:
                        raise DataError(f"{where}: expected question,A,B,C,D,answer-letter; got {len(row)} columns")
                    yield where, _item(where, row[0], row[1:5], LETTERS.index(row[5]), subject)


def builder(name: str, data_dir: str | None = None):
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")


def prepare(name: str, *, data_dir: str | None = None, manual_dir: str | None = None):
    """Write the array_record files for ``name`` from ``manual_dir`` (no download); returns the builder."""
    b = builder(name, data_dir)
    if not b.is_prepared():
        if manual_dir is None:
            raise DataError(f"TFDS dataset {name!r} is not prepared under {b.data_dir}: give manual_dir "
                            "(the directory with the official files)")
        b.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return b


def data_source(name: str, *, split: str, data_dir: str | None = None, manual_dir: str | None = None):
    """Random-access source of one split (prepared first when needed); grain reads it directly."""
    b = prepare(name, data_dir=data_dir, manual_dir=manual_dir)
    if split not in b.info.splits:
        raise DataError(f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(b.info.splits)}")
    return b.as_data_source(split=split)
