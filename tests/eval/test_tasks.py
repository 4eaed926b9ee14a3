"""Task registry, readers and bad-input messages (fast; no model)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from medjax.eval import readers
from medjax.cli_errors import run_cli
from medjax.eval.__main__ import main as eval_main
from medjax.eval.report import summarize
from medjax.eval.requests import Item, Request
from medjax.errors import ConfigError
from medjax.eval.tasks import GROUPS, TASKS, resolve


def test_resolve_groups_and_unknown():
    tasks, groups = resolve("mmlu_medical,medqa")
    assert [t.name for t in tasks] == list(GROUPS["mmlu_medical"]) + ["medqa_4options"]
    assert set(groups) == {"mmlu_medical"}
    assert len(resolve("multimedqa")[0]) == 9
    with pytest.raises(ConfigError, match="mmlu_anatomy.*valid tasks: .*medmcqa"):
        resolve("mmlu_anatomyy")


def test_cli_unknown_task_lists_valid(tmp_path, capsys):
    assert run_cli(eval_main, ["--model", "x", "--tasks", "nope", "--data-dir", str(tmp_path)]) == 2
    assert "valid tasks:" in capsys.readouterr().err


def test_missing_file_names_path_and_source(tmp_path, capsys):
    with pytest.raises(readers.DataError, match="medqa_usmle_4options_test.jsonl.*github.com/jind11/MedQA"):
        readers.load_docs(TASKS["medqa_4options"], tmp_path)
    assert run_cli(eval_main, ["--model", "x", "--tasks", "pubmedqa", "--data-dir", str(tmp_path)]) == 2
    assert "ori_pqal.json" in capsys.readouterr().err


def test_missing_field_names_file_and_line(tmp_path):
    good = {"question": "q", "choices": ["A. a", "B. b", "C. c", "D. d"], "answer": 1}
    (tmp_path / "medmcqa_validation.jsonl").write_text(
        json.dumps(good) + "\n" + json.dumps({"question": "q2", "answer": 0}) + "\n")
    with pytest.raises(readers.DataError, match=r"medmcqa_validation.jsonl:2: .*missing field.*choices"):
        readers.load_docs(TASKS["medmcqa"], tmp_path)


def _lm_eval_module(rel):
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        pytest.skip("lm-eval not installed")
    path = __import__("pathlib").Path(list(spec.submodule_search_locations)[0]) / "tasks" / rel
    mspec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module


def test_pubmedqa_official_files_and_prompt(tmp_path):
    pqal = {"111": {"QUESTION": "Does X help?", "CONTEXTS": ["Background one.", "Results two."],
                    "final_decision": "yes"},
            "222": {"QUESTION": "Is Y safe?", "CONTEXTS": ["Only context."], "final_decision": "no"}}
    (tmp_path / "ori_pqal.json").write_text(json.dumps(pqal))
    (tmp_path / "test_ground_truth.json").write_text(json.dumps({"222": "maybe", "111": "yes"}))
    docs = readers.load_docs(TASKS["pubmedqa"], tmp_path)
    assert [d["label"] for d in docs] == [2, 0]
    lm = _lm_eval_module("pubmedqa/preprocess_pubmedqa.py")
    for doc, pmid in zip(docs, ("222", "111")):
        assert TASKS["pubmedqa"].prompt(doc) == lm.doc_to_text(pqal[pmid])


def test_medmcqa_hf_layout_one_based_cop(tmp_path):
    rows = [{"question": f"q{i}", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": i % 4 + 1,
             "subject_name": "Anatomy"} for i in range(8)]
    (tmp_path / "dev.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = readers.load_docs(TASKS["medmcqa"], tmp_path)
    assert [d["label"] for d in docs] == [i % 4 for i in range(8)]
    lm = _lm_eval_module("medmcqa/utils_medmcqa.py")
    assert TASKS["medmcqa"].prompt(docs[0]) == lm.doc_to_text(rows[0])


def test_group_is_size_weighted():
    def item(task, correct):
        reqs = [Request((1,), (2,), -1.0 if correct else -2.0), Request((1,), (3,), -1.5)]
        return Item(task, 0, {"subject": None}, "", [" A", " B"], ["A", "B"], 0, reqs)
    items = {"a": [item("a", True)] * 3, "b": [item("b", False)]}
    summary = summarize(items, {"a": ("acc",), "b": ("acc",)}, {"g": ("a", "b")})
    assert summary["results"]["a"]["acc"] == 1.0 and summary["results"]["b"]["acc"] == 0.0
    assert summary["groups"]["g"]["acc"] == pytest.approx(0.75)


def test_aliases_are_listed_and_announced(tmp_path, capsys):
    """``--tasks medqa`` (an alias) is in ``--list-tasks`` and says what it resolves to."""
    from medjax.cli_errors import run_cli
    from medjax.eval.tasks import ALIASES
    assert eval_main(["--list-tasks"]) == 0
    listed = capsys.readouterr().out.splitlines()
    for alias, task in ALIASES.items():
        assert f"{alias} (alias of {task})" in listed and task in listed
    (tmp_path / "medqa_usmle_4options_test.jsonl").write_text(json.dumps(
        {"question": "Which drug?", "options": dict(zip("ABCD", "abcd")), "answer_idx": "A"}) + "\n")
    rc = run_cli(eval_main, ["--model", str(tmp_path / "no_model"), "--data-dir", str(tmp_path),
                             "--tasks", "medqa"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and "task 'medqa' is an alias of 'medqa_4options'" in err, err
    assert "no_model" in err[-1]
