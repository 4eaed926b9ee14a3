"""TFDS builders for the medical benchmarks, prepared from local copies of the official files.

Nothing is downloaded: each builder reads its files from the manual directory and writes
array_record shards, which TFDS (without TensorFlow) and grain read by random access. All four
share one schema, the one medjax.eval reads back:
``{id, question, options: [str], label: int (0-based), subject, contexts: [str]}``. The records
are parsed by medjax.data.benchmark_files, the same parsers medjax.eval reads the files with.

| builder | manual files (any of) | splits |
|---|---|---|
| ``medqa`` | ``*medqa*{train,dev,test}*.jsonl`` or ``phrases_no_exclude_{train,dev,test}.jsonl`` (MedQA-USMLE 4 options: question, options{A..D}, answer_idx; or HF sent1, ending0..3, label) | train / validation / test |
| ``medmcqa`` | ``train.json``, ``dev.json``, ``test.json`` (official: opa..opd, cop 1-4; HF export: cop 0-3, detected per file) or ``*medmcqa*{split}*.jsonl`` (choices ["A. .."], answer 0-3) | train / validation / test |
| ``pubmedqa`` | ``ori_pqal.json`` + ``test_ground_truth.json`` (PQA-L) | test (the 500 ground-truth ids), train (the rest) |
| ``mmlu_medical`` | ``*mmlu*test*.jsonl`` with ``subject`` or MMLU CSVs ``{subject}_{split}.csv`` | test / validation / dev |
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from medjax.data import benchmark_files
from medjax.errors import DataError

MMLU_MEDICAL_SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine",
                         "medical_genetics", "professional_medicine")
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


def _item(item: benchmark_files.BenchmarkItem) -> dict:
    return {"id": item.id, "question": item.question, "options": list(item.options), "label": item.label,
            "subject": item.subject or "", "contexts": list(item.contexts)}


def _split_of(path: Path) -> str | None:
    name = path.stem.lower()
    for word, split in _SPLIT_WORDS:
        if word in name:
            return split
    return None


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
            for item in benchmark_files.medqa(path):
                yield item.where, _item(item)


class Medmcqa(_LocalBuilder):
    """MedMCQA: official layout (opa..opd, 1-based cop) or the choices/answer mirror layout."""

    def _split_generators(self, dl_manager):
        files = _files_by_split(Path(dl_manager.manual_dir), ("*medmcqa*.json*", "train.json", "dev.json", "test.json"),
                                 "medmcqa")
        return {split: self._generate_examples(paths) for split, paths in files.items()}

    def _generate_examples(self, paths):
        for path in paths:
            for item in benchmark_files.medmcqa(path):
                yield item.where, _item(item)


class Pubmedqa(_LocalBuilder):
    """PubMedQA PQA-L: yes/no/maybe with the abstract contexts."""

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        pqal, truth = manual / "ori_pqal.json", manual / "test_ground_truth.json"
        for path in (pqal, truth):
            if not path.is_file():
                raise DataError(f"pubmedqa: {path} not found (official PubMedQA data/ files)")
        test_ids = json.loads(truth.read_text(encoding="utf-8"))
        questions = json.loads(pqal.read_text(encoding="utf-8"))
        train = {k: v["final_decision"] for k, v in questions.items() if k not in test_ids and "final_decision" in v}
        splits = {"test": self._generate_examples(pqal, test_ids, truth)}
        if train:
            splits["train"] = self._generate_examples(pqal, train, pqal)
        return splits

    def _generate_examples(self, pqal, labels, labels_file):
        for item in benchmark_files.pubmedqa(pqal, labels, labels_file):
            yield item.id, _item(item)


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
            items = benchmark_files.mmlu_jsonl(path) if subject is None else benchmark_files.mmlu_csv(path, subject)
            for item in items:
                if item.subject in MMLU_MEDICAL_SUBJECTS:
                    yield item.where, _item(item)


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
