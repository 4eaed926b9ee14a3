"""Judging: verdict log-probs equal a plain forward pass; both orders cancel position bias."""
import numpy as np
import pytest

from medjax.arena import judge as J
from medjax.arena.questions import Question
from medjax.arena.ratings import Comparison, rate
from medjax.arena.rubric import load_rubric
from medjax.arena.store import JsonlStore


def test_verdict_logprobs_match_a_full_forward(arena_files):
    import jax
    import jax.numpy as jnp

    import medjax
    model, tokenizer = medjax.load(arena_files["judge"])
    judge = J.Judge(model, tokenizer, batch_size=2)
    assert [len(ids) for ids in judge.verdict_ids] == [1, 1, 3]      # "tie" is 3 byte tokens
    prompts = [judge.prompt_ids(t) for t in ("Which is better?", "x" * 30, "Is it A or B?")]
    got = judge.logprobs(prompts)                    # 2 batches, a padded row, different lengths
    # Reference: one plain forward over every prompt + label (right padding cannot reach back).
    rows = [(ids, label) for ids in prompts for label in judge.verdict_ids]
    T = max(len(ids) + len(label) for ids, label in rows)
    batch = np.zeros((len(rows), T), np.int32)
    for r, (ids, label) in enumerate(rows):
        batch[r, :len(ids) + len(label)] = ids + label
    lp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(batch)), axis=-1))
    want = [sum(lp[r, len(ids) - 1 + t, tok] for t, tok in enumerate(label)) for r, (ids, label) in enumerate(rows)]
    np.testing.assert_allclose(got.reshape(-1), want, atol=2e-4)


def test_verdict_of_normalises_over_the_labels():
    verdict, probs = J.verdict_of(np.log(np.array([0.2, 0.1, 0.1])))
    assert verdict == "A"
    assert probs == pytest.approx({"A": 0.5, "B": 0.25, "tie": 0.25})


class AlwaysFirstJudge:
    """Puts all its probability on 'A', whatever the answers say."""
    batch_size = 4

    def prompt_ids(self, text):
        return [len(text)]

    def logprobs(self, prompts):
        return np.tile(np.log([0.98, 0.01, 0.01]), (len(prompts), 1))


@pytest.mark.parametrize("both_orders,scoring", [(True, "verdict"), (True, "expected"), (False, "verdict")])
def test_order_swapping_cancels_an_always_first_judge(tmp_path, both_orders, scoring):
    names = ["good", "fair", "poor"]
    questions = [Question(f"q{i}", f"question {i}") for i in range(6)]
    pairs = J.pairings(questions, names, both_orders=both_orders)
    rubric = load_rubric()                         # the bundled clinical rubric
    store = JsonlStore(tmp_path / "judgements.jsonl")
    keys, todo = J.pending(pairs, lambda m, q: f"{m} answer to {q.question}", rubric, "judge", store)
    assert J.run_judging(todo, AlwaysFirstJudge(), "judge", store) == len(keys)
    records = [store[k] for k in keys]
    assert {r["verdict"] for r in records} == {"A"}
    ratings = rate([Comparison(r["question_id"], r["first"], r["second"], J.first_score(r, scoring))
                    for r in records], names, rounds=50)
    spread = max(r.rating for r in ratings) - min(r.rating for r in ratings)
    if both_orders:      # every model won exactly as often as it lost: no preference survives
        assert len(records) == 6 * 3 * 2
        assert spread == pytest.approx(0.0, abs=1e-6)
        if scoring == "verdict":
            assert all(r.wins == r.losses == 6 * 2 for r in ratings)
        stats = J.position_stats(records)
        assert stats == {"verdict_share": {"A": 1.0, "B": 0.0, "tie": 0.0}, "orders_agree": 0.0,
                         "pairs_in_both_orders": 6 * 3}
        assert "ratings carry no information" in J.order_warning(stats)
    else:                # one order only: the bias becomes a fake ranking (the control)
        assert spread > 400


class ContentJudge(AlwaysFirstJudge):
    """Picks the 'good' model's answer whichever order it is shown in (its prompt id says where)."""

    def prompt_ids(self, text):
        return [int(text.index("good answer") < text.index("fair answer"))]   # 1: good is shown first

    def logprobs(self, prompts):
        return np.array([np.log([0.9, 0.05, 0.05] if p[0] else [0.05, 0.9, 0.05]) for p in prompts])


@pytest.mark.parametrize("judge, warned", [(AlwaysFirstJudge(), True), (ContentJudge(), False)],
                         ids=["always-first", "reads-the-answers"])
def test_a_judge_that_follows_the_order_is_reported(tmp_path, judge, warned):
    """The leaderboard (and the CLI, on stderr) says a judge is degenerate when the two orders
    agree on fewer than half the pairs; a judge that reads the answers passes."""
    from medjax.arena import leaderboard
    names = ["good", "fair"]
    questions = [Question(f"q{i}", f"question {i}") for i in range(4)]
    store = JsonlStore(tmp_path / "judgements.jsonl")
    keys, todo = J.pending(J.pairings(questions, names), lambda m, q: f"{m} answer to {q.question}",
                           load_rubric(), "judge", store)
    J.run_judging(todo, judge, "judge", store)
    records = [store[k] for k in keys]
    stats = J.position_stats(records)
    assert stats["orders_agree"] == (0.0 if warned else 1.0) and stats["pairs_in_both_orders"] == 4
    info = {"judge": "judge", "questions": 4, "judgements": 8, "bootstrap_rounds": 10, **stats,
            "judge_warning": J.order_warning(stats)}
    ratings = rate([Comparison(r["question_id"], r["first"], r["second"], J.first_score(r)) for r in records],
                   names, rounds=10)
    board = leaderboard.markdown(ratings, info)
    assert ("ratings carry no information" in board) == warned
    assert ("0% of 4 pairs" in board) == warned
