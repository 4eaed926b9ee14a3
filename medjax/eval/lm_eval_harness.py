"""Run lm-evaluation-harness 0.4.13 offline on local files: the reference for parity tests and
the side-by-side benchmark (``python -m medjax.bench eval``). Needs ``lm-eval`` (a test extra).

``write_task_files`` writes, from the medjax-layout benchmark files, the same items in the
field layout lm-eval's shipped task yamls expect, plus yamls that ``include:`` the shipped
ones (so lm-eval's own prompt functions are used) with ``dataset_path: json``.

``run_lm_eval`` runs ``simple_evaluate`` in a subprocess (HF offline env set before any HF
import) and returns per-task per-item ``[[loglikelihood, is_greedy], ...]`` and metrics.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TASK_PREFIX = "pt_"


def _lm_eval_tasks_dir() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("lm_eval")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_task_files(data_dir: Path, task_dir: Path, *, fewshot_split: str = "test") -> list[str]:
    """lm-eval layouts + yamls for every benchmark file present in ``data_dir``; returns the
    lm-eval task names (``pt_<medjax task name>``)."""
    task_dir.mkdir(parents=True, exist_ok=True)
    shipped = _lm_eval_tasks_dir()
    names = []

    def yaml(name, include, data_file, extra=""):
        (task_dir / f"{name}.yaml").write_text(
            f"include: {include}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
            f"training_split: null\nvalidation_split: null\ntest_split: test\n"
            f"fewshot_split: {fewshot_split}\n{extra}")
        names.append(name)

    medqa = data_dir / "medqa_usmle_4options_test.jsonl"
    if medqa.is_file():
        rows = [json.loads(line) for line in medqa.read_text().splitlines() if line.strip()]
        _jsonl(task_dir / "medqa.jsonl", [
            {"sent1": r["question"], **{f"ending{i}": r["options"][k] for i, k in enumerate("ABCD")},
             "label": "ABCD".index(r["answer_idx"])} for r in rows])
        yaml(f"{TASK_PREFIX}medqa_4options", shipped / "medqa" / "medqa.yaml", task_dir / "medqa.jsonl")
        yaml(f"{TASK_PREFIX}medqa_4options_full", shipped / "medqa" / "medqa.yaml",
             task_dir / "medqa.jsonl", "doc_to_choice: \"{{[ending0, ending1, ending2, ending3]}}\"\n")
    medmcqa = data_dir / "medmcqa_validation.jsonl"
    if medmcqa.is_file():
        rows = [json.loads(line) for line in medmcqa.read_text().splitlines() if line.strip()]
        _jsonl(task_dir / "medmcqa.jsonl", [
            {"question": r["question"], **{f"op{c}": r["choices"][i][3:] for i, c in enumerate("abcd")},
             "cop": r["answer"]} for r in rows])
        yaml(f"{TASK_PREFIX}medmcqa", shipped / "medmcqa" / "medmcqa.yaml", task_dir / "medmcqa.jsonl")
    mmlu = data_dir / "mmlu_medical_test.jsonl"
    if mmlu.is_file():
        rows = [json.loads(line) for line in mmlu.read_text().splitlines() if line.strip()]
        for subject in sorted({r["subject"] for r in rows}):
            sub = [r for r in rows if r["subject"] == subject]
            _jsonl(task_dir / f"mmlu_{subject}.jsonl", [
                {"question": r["question"], "choices": [r["options"][k] for k in "ABCD"],
                 "answer": "ABCD".index(r["answer_idx"]), "subject": subject} for r in sub])
            yaml(f"{TASK_PREFIX}mmlu_{subject}", shipped / "mmlu" / "default" / f"mmlu_{subject}.yaml",
                 task_dir / f"mmlu_{subject}.jsonl", "tag: null\n")
    return names


_CHILD = r"""
import json, sys, time
import lm_eval
from lm_eval.tasks import TaskManager
from lm_eval.models.huggingface import HFLM
spec = json.load(open(sys.argv[1]))
out = {}
for run in spec["runs"]:
    t0 = time.perf_counter()
    lm = HFLM(pretrained=run["model"], dtype="float32", batch_size=run.get("batch_size", 1), device="cpu")
    t1 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=lm, tasks=run["tasks"], task_manager=TaskManager(include_path=spec["task_dir"]),
        num_fewshot=run.get("num_fewshot", 0), apply_chat_template=run.get("chat", False),
        fewshot_as_multiturn=run.get("fewshot_as_multiturn", bool(run.get("chat", False))),
        log_samples=True, limit=run.get("limit"))
    out[run["name"]] = {
        "load_s": t1 - t0, "eval_s": time.perf_counter() - t1,
        "results": {t: {k: v for k, v in r.items() if isinstance(v, (int, float))}
                    for t, r in res["results"].items()},
        "samples": {t: sorted([{"doc_id": s["doc_id"],
                                "resps": [[float(x[0][0]), bool(x[0][1])] for x in s["resps"]],
                                "context": (s["arguments"]["gen_args_0"]["arg_0"]
                                            if isinstance(s["arguments"], dict) else s["arguments"][0][0]),
                                "acc": s.get("acc")} for s in ss], key=lambda s: s["doc_id"])
                    for t, ss in res["samples"].items()},
    }
json.dump(out, open(sys.argv[2], "w"))
"""


def run_lm_eval(runs: list[dict], task_dir: Path, work_dir: Path, timeout: int = 7200) -> dict:
    """``runs``: [{"name", "model" (HF dir), "tasks", "num_fewshot"?, "chat"?, "limit"?}]."""
    spec, out = work_dir / "lm_eval_spec.json", work_dir / "lm_eval_out.json"
    spec.write_text(json.dumps({"runs": runs, "task_dir": str(task_dir)}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(work_dir / "hf_datasets"), HF_HOME=str(work_dir / "hf_home"),
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(spec), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())
