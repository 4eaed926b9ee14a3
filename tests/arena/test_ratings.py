"""Bradley–Terry/Elo fit: recovers known strengths, exact on the 10:1 definition, centring."""
import math

import numpy as np
import pytest

from medjax.arena.ratings import Comparison, fit_bradley_terry, question_matrices, rate


def simulate(true: dict, n_questions: int, seed: int = 0, tie_rate: float = 0.0):
    """Each question: every pair once, outcome drawn from the Bradley–Terry model on the Elo
    scale; with ``tie_rate`` a share of games is a tie (expected score kept)."""
    rng = np.random.default_rng(seed)
    names, comps = list(true), []
    for q in range(n_questions):
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                p = 1.0 / (1.0 + 10 ** ((true[b] - true[a]) / 400.0))
                if rng.random() < tie_rate:
                    score = 0.5
                else:
                    score = float(rng.random() < (p - 0.5 * tie_rate) / (1 - tie_rate))
                comps.append(Comparison(f"q{q}", a, b, score))
    return names, comps


def test_recovers_known_strengths():
    true = {"m1": 1250.0, "m2": 1100.0, "m3": 1000.0, "m4": 900.0, "m5": 750.0}
    names, comps = simulate(true, n_questions=600, seed=1)
    ratings = {r.name: r for r in rate(comps, names, rounds=200, seed=0)}
    truth_centred = {n: v - np.mean(list(true.values())) + 1000 for n, v in true.items()}
    errors = {n: ratings[n].rating - truth_centred[n] for n in names}
    assert max(abs(e) for e in errors.values()) < 30, errors
    # The 95% intervals cover the truth (all five here; allow one miss by chance).
    misses = [n for n in names if not ratings[n].low <= truth_centred[n] <= ratings[n].high]
    assert len(misses) <= 1, (misses, ratings)
    assert [r.name for r in rate(comps, names, rounds=0)] == ["m1", "m2", "m3", "m4", "m5"]


def test_recovers_strengths_with_ties_as_half():
    true = {"a": 1150.0, "b": 1000.0, "c": 850.0}
    names, comps = simulate(true, n_questions=800, seed=2, tie_rate=0.3)
    assert any(c.score == 0.5 for c in comps)
    ratings = {r.name: r.rating for r in rate(comps, names, rounds=0)}
    for n in names:
        assert abs(ratings[n] - true[n]) < 30, ratings


def test_ten_to_one_odds_is_400_points():
    comps = [Comparison(f"q{i}", "strong", "weak", 1.0) for i in range(10)]
    comps.append(Comparison("q10", "strong", "weak", 0.0))
    _, W, N = question_matrices(comps, ["strong", "weak"])
    beta = fit_bradley_terry(W.sum(0), N.sum(0), l2=0.0)
    assert (beta[0] - beta[1]) * 400 / math.log(10) == pytest.approx(400.0, abs=1e-6)


def test_mle_solves_the_score_equations():
    names, comps = simulate({"a": 1100.0, "b": 1000.0, "c": 960.0, "d": 800.0}, 50, seed=3)
    _, W, N = question_matrices(comps, names)
    W, N = W.sum(0), N.sum(0)
    beta = fit_bradley_terry(W, N, l2=0.0)
    p = 1 / (1 + np.exp(-(beta[:, None] - beta[None, :])))
    np.testing.assert_allclose((N * p).sum(1), W.sum(1), atol=1e-6)   # expected wins == wins


def test_centring_and_anchor():
    names, comps = simulate({"a": 1300.0, "b": 1000.0, "c": 900.0}, 200, seed=4)
    mean_centred = {r.name: r for r in rate(comps, names, rounds=20)}
    assert np.mean([r.rating for r in mean_centred.values()]) == pytest.approx(1000.0)
    anchored = {r.name: r for r in rate(comps, names, anchor="c", rounds=20)}
    assert anchored["c"].rating == pytest.approx(1000.0)
    assert anchored["c"].low == pytest.approx(1000.0) and anchored["c"].high == pytest.approx(1000.0)
    gap = lambda d: d["a"].rating - d["b"].rating
    assert gap(anchored) == pytest.approx(gap(mean_centred))
    with pytest.raises(ValueError, match="anchor"):
        rate(comps, names, anchor="zzz")


def test_clean_sweep_stays_finite_and_counts_records():
    comps = [Comparison(f"q{i}", "a", "b", 1.0) for i in range(5)] + [Comparison("q5", "b", "a", 0.5)]
    ratings = {r.name: r for r in rate(comps, ["a", "b"], rounds=50)}
    assert np.isfinite(ratings["a"].rating) and ratings["a"].rating > ratings["b"].rating + 400
    assert (ratings["a"].wins, ratings["a"].ties, ratings["a"].losses) == (5, 1, 0)
    assert (ratings["b"].wins, ratings["b"].ties, ratings["b"].losses) == (0, 1, 5)
