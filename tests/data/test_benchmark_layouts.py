"""medjax.eval's readers and the TFDS builders give identical examples for every benchmark layout.

Small files of each layout are written from the first rows of the real benchmark files; the gold
answer is checked against the source row's answer text, so a path that is off by one fails even
when both agree. (TruthfulQA has no TFDS builder; PubMedQA has one layout, the official release.)
"""
import csv
import json

import pytest

pytest.importorskip("tensorflow_datasets")

N = 12


def _rows(benchmarks_dir, name):
    """The first N rows, plus rows until every answer position has appeared (MedMCQA's cop base is
    detected from the file: a file with both 0 and 4 absent would be ambiguous)."""
    rows, seen = [], set()
    for line in (benchmarks_dir / name).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        rows.append(rec)
        seen.add(str(rec.get("answer", rec.get("answer_idx"))))
        if len(rows) >= N and len(seen) == 4:
            return rows
    return rows


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _medqa(benchmarks_dir, layout):
    rows = _rows(benchmarks_dir, "medqa_usmle_4options_test.jsonl")
    answers = [r["options"][r["answer_idx"]] for r in rows]
    if layout == "official":     # jind11/MedQA phrases_no_exclude_test.jsonl: no realidx
        records = [{k: r[k] for k in ("question", "answer", "options", "meta_info", "answer_idx")} for r in rows]
        return {"phrases_no_exclude_test.jsonl": records}, answers
    records = [{"id": f"q{i}", "sent1": r["question"], "label": "ABCD".index(r["answer_idx"]),
                **{f"ending{j}": r["options"][k] for j, k in enumerate("ABCD")}} for i, r in enumerate(rows)]
    return {"medqa_4options_test.jsonl": records}, answers


def _medmcqa(benchmarks_dir, layout):
    rows = _rows(benchmarks_dir, "medmcqa_validation.jsonl")
    answers = [r["choices"][r["answer"]][3:] for r in rows]
    if layout == "mirror":
        return {"medmcqa_validation.jsonl": rows}, answers
    base = 1 if layout == "official" else 0          # official dev.json: cop 1-4; HF export: 0-3
    records = [{"id": f"mm{i}", "question": r["question"], "cop": r["answer"] + base, "subject_name": "Anatomy",
                **{f"op{x}": c[3:] for x, c in zip("abcd", r["choices"])}} for i, r in enumerate(rows)]
    return {"dev.json": records}, answers


def _mmlu(benchmarks_dir, layout):
    rows = _rows(benchmarks_dir, "mmlu_medical_test.jsonl")
    answers = [r["options"][r["answer_idx"]] for r in rows]
    if layout == "jsonl":
        return {"mmlu_medical_test.jsonl": rows}, answers
    return {f"test/{rows[0]['subject']}_test.csv": [[r["question"], *(r["options"][k] for k in "ABCD"),
                                                     r["answer_idx"]] for r in rows]}, answers


def _pubmedqa(benchmarks_dir, layout):
    decisions = ["yes", "no", "maybe", "yes", "no", "yes"]
    pqal = {str(2000 + i): {"QUESTION": f"Does treatment {i} reduce mortality?",
                            "CONTEXTS": [f"Background {i}.", f"Results {i}."], "final_decision": d}
            for i, d in enumerate(decisions)}
    truth = {k: v["final_decision"] for k, v in list(pqal.items())[:4]}
    return {"ori_pqal.json": pqal, "test_ground_truth.json": truth}, list(truth.values())


CASES = [("medqa", "official", _medqa, "medqa", "test"), ("medqa", "hf", _medqa, "medqa", "test"),
         ("medmcqa", "official", _medmcqa, "medmcqa", "validation"),
         ("medmcqa", "hf", _medmcqa, "medmcqa", "validation"),
         ("medmcqa", "mirror", _medmcqa, "medmcqa", "validation"),
         ("mmlu", "jsonl", _mmlu, "mmlu_medical", "test"), ("mmlu", "csv", _mmlu, "mmlu_medical", "test"),
         ("pubmedqa", "official", _pubmedqa, "pubmedqa", "test")]


def _write(directory, files):
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".csv"):
            with open(path, "w", encoding="utf-8", newline="") as f:
                csv.writer(f).writerows(content)
        elif name.endswith(".json") and isinstance(content, dict):
            path.write_text(json.dumps(content), encoding="utf-8")
        else:
            _write_jsonl(path, content)


def _canonical(id_, question, options, label, subject, contexts):
    return {"id": id_, "question": question, "options": list(options), "label": int(label),
            "subject": subject or None, "contexts": list(contexts)}


@pytest.mark.parametrize("dataset,layout,make,tfds_name,split", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_eval_and_tfds_read_the_same_examples(tmp_path, benchmarks_dir, dataset, layout, make, tfds_name, split):
    from medjax.data import tfds_builders
    from medjax.eval import readers

    files, answers = make(benchmarks_dir, layout)
    manual = tmp_path / "manual"
    _write(manual, files)
    subject = next(iter(files)).split("/")[-1].removesuffix("_test.csv") if layout == "csv" else None
    from_eval = [_canonical(d["id"], d["question"], d["options"], d["label"], d["subject"], d.get("contexts", ()))
                 for d in readers.read_dataset(dataset, manual, subject=subject)]

    source = tfds_builders.data_source(tfds_name, split=split, data_dir=str(tmp_path / "tfds"),
                                       manual_dir=str(manual))
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    from_tfds = [_canonical(text(r["id"]), text(r["question"]), [text(o) for o in r["options"]], r["label"],
                            text(r["subject"]), [text(c) for c in r["contexts"]])
                 for r in (source[i] for i in range(len(source)))]

    assert len(from_eval) == len(answers)
    key = lambda d: d["id"]  # noqa: E731  (TFDS stores records in its own order)
    assert sorted(from_tfds, key=key) == sorted(from_eval, key=key)
    assert [d["options"][d["label"]] for d in from_eval] == answers
