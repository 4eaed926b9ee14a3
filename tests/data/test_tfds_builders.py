"""TFDS builders prepare the real benchmark files (no download) and grain reads them."""
import json

import pytest

pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name,split,count", [("medqa", "test", 1273), ("medmcqa", "validation", 4183),
                                              ("mmlu_medical", "test", 1089)])
def test_builders_prepare_real_files(tmp_path_factory, benchmarks_dir, name, split, count):
    import grain
    from medjax.data import tfds_builders
    data_dir = tmp_path_factory.mktemp("tfds")
    source = tfds_builders.data_source(name, split=split, data_dir=str(data_dir), manual_dir=str(benchmarks_dir))
    assert len(source) == count
    records = grain.MapDataset.source(source)
    first = records[0]
    assert set(first) == {"id", "question", "options", "label", "subject", "contexts"}
    assert 0 <= first["label"] < len(first["options"]) == 4
    if name == "mmlu_medical":
        subjects = {records[i]["subject"].decode() for i in range(len(records))}
        assert subjects == set(tfds_builders.MMLU_MEDICAL_SUBJECTS)
    # the label points at the file's answer: check one record against the raw file
    raw_name = {"medqa": "medqa_usmle_4options_test.jsonl", "medmcqa": "medmcqa_validation.jsonl",
                "mmlu_medical": "mmlu_medical_test.jsonl"}[name]
    by_question = {}
    for line in (benchmarks_dir / raw_name).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        by_question[rec["question"]] = rec
    rec = by_question[first["question"].decode()]
    option = first["options"][first["label"]].decode()
    if name == "medmcqa":
        assert rec["choices"][rec["answer"]][3:] == option
    else:
        assert rec["options"][rec["answer_idx"]] == option


def test_pubmedqa_builder_on_official_layout(tmp_path):
    from medjax.data import tfds_builders
    manual = tmp_path / "manual"
    manual.mkdir()
    decisions = ["yes", "no", "maybe", "yes", "no", "yes"]
    pqal = {str(1000 + i): {"QUESTION": f"Does drug {i} work?", "CONTEXTS": [f"Context {i}a.", f"Context {i}b."],
                            "final_decision": d, "LONG_ANSWER": "..."} for i, d in enumerate(decisions)}
    truth = {str(1000 + i): decisions[i] for i in (0, 1, 2, 3)}
    (manual / "ori_pqal.json").write_text(json.dumps(pqal))
    (manual / "test_ground_truth.json").write_text(json.dumps(truth))
    test = tfds_builders.data_source("pubmedqa", split="test", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    train = tfds_builders.data_source("pubmedqa", split="train", data_dir=str(tmp_path / "tfds"))
    assert len(test) == 4 and len(train) == 2
    got = {test[i]["id"].decode(): test[i] for i in range(len(test))}
    for pmid, decision in truth.items():
        assert [o.decode() for o in got[pmid]["options"]][got[pmid]["label"]] == decision
        assert [c.decode() for c in got[pmid]["contexts"]] == pqal[pmid]["CONTEXTS"]


def test_tfds_source_in_pipeline(tmp_path, benchmarks_dir, tokenizer):
    from medjax.config import DataSection
    from medjax.data import make_dataset
    cfg = DataSection(sources=({"tfds": "mmlu_medical", "split": "test", "data_dir": str(tmp_path),
                                "manual_dir": str(benchmarks_dir)},), format="mcqa",
                      fields={"answer": "label"}, seq_len=256)
    batch = next(make_dataset(cfg, tokenizer, batch_size=2, seed=0, process_index=0, process_count=1))
    assert batch["input_ids"].shape == (2, 256) and batch["loss_mask"].sum() > 0
