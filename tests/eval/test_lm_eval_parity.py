"""medjax.eval vs lm-evaluation-harness 0.4.13 (``--model hf``, offline) on the real benchmark
files: every per-item per-choice log-likelihood within 1e-4 (fp32), identical prompts,
greedy flags, predictions and accuracies — plain, chat template, few-shot, BOS tokenizers,
and full-answer (multi-token, KV-cache) scoring."""
from __future__ import annotations

import json

import pytest

from medjax.eval.lm_eval_harness import TASK_PREFIX, run_lm_eval, write_task_files

N_ITEMS = 10

RUNS = [
    # name, model variant, medjax tasks, options
    ("plain", "smol", ["medqa_4options", "medmcqa", "mmlu_anatomy", "mmlu_college_medicine"], {}),
    ("full_answer", "smol", ["medqa_4options"], {"score": "full_answer"}),
    ("chat", "smol", ["medqa_4options", "medmcqa", "mmlu_anatomy"], {"chat": True}),
    ("bos_fewshot", "bos", ["medqa_4options", "mmlu_college_medicine"], {"num_fewshot": 2, "limit": 8}),
    ("bos_chat_fewshot", "bos", ["medmcqa", "mmlu_anatomy"], {"chat": True, "num_fewshot": 1, "limit": 6}),
]


def _subset(benchmarks_dir, out_dir):
    """First N items of MedQA and MedMCQA, first N/2 of two MMLU subjects, in medjax layout."""
    out_dir.mkdir()
    for name in ("medqa_usmle_4options_test.jsonl", "medmcqa_validation.jsonl"):
        lines = (benchmarks_dir / name).read_text(encoding="utf-8").splitlines(True)[:N_ITEMS]
        (out_dir / name).write_text("".join(lines), encoding="utf-8")
    rows = [json.loads(line) for line in (benchmarks_dir / "mmlu_medical_test.jsonl").open(encoding="utf-8")]
    picked = []
    for subject in ("anatomy", "college_medicine"):
        picked += [r for r in rows if r["subject"] == subject][: N_ITEMS // 2]
    (out_dir / "mmlu_medical_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    return out_dir


@pytest.fixture(scope="module")
def parity_results(benchmarks_dir, tiny_smol_dirs, tmp_path_factory):
    work = tmp_path_factory.mktemp("parity")
    data_dir = _subset(benchmarks_dir, work / "data")
    write_task_files(data_dir, work / "tasks")
    lm_runs = []
    for name, variant, tasks, opts in RUNS:
        lm_tasks = [TASK_PREFIX + t + ("_full" if opts.get("score") == "full_answer" else "") for t in tasks]
        lm_runs.append({"name": name, "model": str(tiny_smol_dirs[variant]), "tasks": lm_tasks,
                        "chat": opts.get("chat", False), "num_fewshot": opts.get("num_fewshot", 0),
                        "limit": opts.get("limit"), "batch_size": 8})
    lm = run_lm_eval(lm_runs, work / "tasks", work)

    import jax.numpy as jnp

    import medjax
    from medjax.eval.runner import evaluate
    ours = {}
    for name, variant, tasks, opts in RUNS:
        # float32 on both sides (run_lm_eval passes dtype="float32"), whatever --dtype auto picks.
        model, tokenizer = medjax.load(tiny_smol_dirs[variant], dtype=jnp.float32, progress=False)
        ours[name] = evaluate(model, tokenizer, tasks, data_dir, limit=opts.get("limit"),
                              num_fewshot=opts.get("num_fewshot", 0), chat_template=opts.get("chat", False),
                              score=opts.get("score", "letter"), log_samples=True, tokens_per_batch=1024)
    return lm, ours


@pytest.mark.slow
@pytest.mark.parametrize("run", [r[0] for r in RUNS])
def test_matches_lm_eval(parity_results, run):
    lm, ours = parity_results
    name, variant, tasks, opts = next(r for r in RUNS if r[0] == run)
    for task in tasks:
        lm_task = TASK_PREFIX + task + ("_full" if opts.get("score") == "full_answer" else "")
        theirs = lm[run]["samples"][lm_task]
        mine = ours[run]["samples"][task]
        assert len(theirs) == len(mine) > 0, (task, len(theirs), len(mine))
        for t, m in zip(theirs, mine):
            where = f"{run}/{task} item {m['doc_id']}"
            assert t["doc_id"] == m["doc_id"], where
            assert t["context"] == m["context"], f"{where}: prompt differs"
            lls = [r[0] for r in t["resps"]]
            assert max(abs(a - b) for a, b in zip(lls, m["loglikelihoods"])) < 1e-4, \
                (where, lls, m["loglikelihoods"])
            assert [r[1] for r in t["resps"]] == m["is_greedy"], where
            assert t["acc"] == m["acc"], where
        assert lm[run]["results"][lm_task]["acc,none"] == pytest.approx(ours[run]["results"][task]["acc"], abs=1e-12)
        if "acc_norm,none" in lm[run]["results"][lm_task]:
            assert lm[run]["results"][lm_task]["acc_norm,none"] == \
                pytest.approx(ours[run]["results"][task]["acc_norm"], abs=1e-12)
