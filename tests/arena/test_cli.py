"""``python -m medjax.arena`` end to end on tiny models: outputs, kill + resume, fixed seeds."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medjax.arena import judge as J
from medjax.arena.__main__ import main
from medjax.arena.ratings import Comparison, rate

ROOT = Path(__file__).resolve().parents[2]

# Runs the real CLI but SIGKILLs the process when the judge is asked for its 2nd batch,
# i.e. after the 1st batch of judgements was written.
KILLER = """
import os, signal, sys
from medjax.arena import judge as J
calls = []
original = J.Judge.logprobs
def logprobs(self, prompts):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, prompts)
J.Judge.logprobs = logprobs
from medjax.arena.__main__ import main
main(sys.argv[1:])
"""


def arena_args(files, run_dir, out):
    return ["--models", f"alpha={files['alpha']},trained={run_dir}", "--judge", str(files["judge"]),
            "--questions", str(files["questions"]), "--rubric", str(files["rubric"]), "--out", str(out),
            "--max-new-tokens", "6", "--batch-size", "2", "--judge-batch", "2", "--bootstrap", "50",
            "--med42-sampling", "--seed", "3"]


def lines(path):
    return path.read_text().splitlines()


def test_resume_after_kill_redoes_no_finished_judgement(arena_files, tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = arena_args(arena_files, tiny_run, out)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True,
                            timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(lines(out / "answers.jsonl")) == 2 * 3                 # both models answered
    before = lines(out / "judgements.jsonl")
    assert len(before) == 2                                            # one batch of 2 judged
    assert not (out / "leaderboard.json").exists()

    judged = []
    original = J.Judge.logprobs
    monkeypatch.setattr(J.Judge, "logprobs", lambda self, prompts: judged.extend(prompts) or original(self, prompts))
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "answers alpha: 3 cached, 0 to generate" in err and "answers trained: 3 cached, 0 to generate" in err
    assert "judgements: 2 cached, 4 to judge" in err
    after = lines(out / "judgements.jsonl")
    assert len(judged) == 4 and len(after) == 6 and after[:2] == before
    records = [json.loads(x) for x in after]
    assert len({r["key"] for r in records}) == 6
    # Every question x pair x order exactly once.
    assert sorted((r["question_id"], r["first"]) for r in records) == sorted(
        (q, m) for q in ("mi", "2", "hypo") for m in ("alpha", "trained"))

    # The leaderboard is the Bradley-Terry fit of exactly these judgements.
    board = json.loads((out / "leaderboard.json").read_text())
    want = rate([Comparison(r["question_id"], r["first"], r["second"], r["score_first"]) for r in records],
                ["alpha", "trained"], rounds=50, seed=3)
    assert [(x["model"], x["elo"]) for x in board["ratings"]] == [(r.name, round(r.rating, 1)) for r in want]
    assert np.mean([x["elo"] for x in board["ratings"]]) == pytest.approx(1000.0, abs=0.1)
    assert board["judgements"] == 6 and board["answers"]["sampling"] == {"temperature": 0.4, "top_k": 150, "top_p": 0.75}
    assert "| 1 |" in (out / "leaderboard.md").read_text()
    assert (out / "ratings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second rerun does nothing; a fresh uninterrupted run gives the same answers (fixed seeds)
    # and the same judgements.
    judged.clear()
    assert main(args) == 0 and judged == []
    fresh = tmp_path / "fresh"
    assert main(arena_args(arena_files, tiny_run, fresh)) == 0
    strip = lambda rows: sorted(json.dumps(json.loads(x), sort_keys=True) for x in rows)
    assert strip(lines(fresh / "answers.jsonl")) == strip(lines(out / "answers.jsonl"))
    assert strip(lines(fresh / "judgements.jsonl")) == strip(after)


def test_a_contestant_that_is_the_judge_is_loaded_once(arena_files, tiny_run, tmp_path, monkeypatch):
    """The judge's own model answers last and then judges (one load, not two); its judgements
    equal those of a judge loaded afresh (the answers cached, so no contestant model loads)."""
    import medjax.arena.__main__ as arena_main
    loads, original = [], arena_main._load
    monkeypatch.setattr(arena_main, "_load", lambda path, dtype: loads.append(str(path)) or original(path, dtype))
    args = arena_args(arena_files, tiny_run, tmp_path / "reused")
    args[args.index("--judge") + 1] = str(arena_files["alpha"])
    assert main(args) == 0
    assert loads == [str(tiny_run), str(arena_files["alpha"])]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "answers.jsonl").write_text((tmp_path / "reused" / "answers.jsonl").read_text())
    loads.clear()
    assert main([*args[:args.index("--out") + 1], str(fresh), *args[args.index("--out") + 2:]]) == 0
    assert loads == [str(arena_files["alpha"])]
    assert lines(fresh / "judgements.jsonl") == lines(tmp_path / "reused" / "judgements.jsonl")
