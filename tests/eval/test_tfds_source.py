"""Reading a benchmark from the TFDS dataset medjax.data prepares (when no file is given)."""
import pytest


def test_medqa_from_tfds(benchmarks_dir, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from medjax.data import tfds_builders
    from medjax.eval import readers
    from medjax.eval.tasks import TASKS

    manual = tmp_path / "manual"
    manual.mkdir()
    lines = (benchmarks_dir / "medqa_usmle_4options_test.jsonl").read_text().splitlines(True)[:6]
    (manual / "medqa_test.jsonl").write_text("".join(lines))
    tfds_builders.prepare("medqa", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    from_tfds = readers.load_docs(TASKS["medqa_4options"], tmp_path / "tfds")
    from_file = readers.load_docs(TASKS["medqa_4options"], _file_dir(tmp_path, lines))
    assert sorted([(d["question"], d["options"], d["label"]) for d in from_tfds]) == \
        sorted([(d["question"], d["options"], d["label"]) for d in from_file])


def _file_dir(tmp_path, lines):
    d = tmp_path / "files"
    d.mkdir()
    (d / "medqa_usmle_4options_test.jsonl").write_text("".join(lines))
    return d
