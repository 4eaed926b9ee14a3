"""Bradley–Terry ratings on the Elo scale, with bootstrap intervals over questions.

Model ``i`` beats model ``j`` with probability ``1 / (1 + 10 ** ((R_j - R_i) / 400))``: a
400-point gap is 10:1 odds. A comparison scores ``s`` for its first model (1 win, 0.5 tie,
0 loss, or a fraction); a tie counts as half a win and half a loss in the likelihood.
The maximum-likelihood ratings come from Newton's method on the natural-log scale
(``beta = R * ln(10) / 400``), where the negative log-likelihood is convex. Only differences
are identified, so a small ridge ``l2 / 2 * |beta|^2`` fixes the level and keeps a model that
won every comparison finite; the ratings are then shifted so their mean is 1000, or so the
``anchor`` model sits at 1000.

Comparisons are aggregated per question into score/game matrices, so a bootstrap round
(questions resampled with replacement) is a weighted sum of matrices plus one small fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

ELO_SCALE = 400.0 / math.log(10.0)   # rating points per natural-log unit of odds
CENTRE = 1000.0


@dataclass(frozen=True)
class Comparison:
    question: str
    first: str
    second: str
    score: float          # of `first`: 1 win, 0.5 tie, 0 loss (or a fraction: counted a win above 0.5)


@dataclass(frozen=True)
class Rating:
    name: str
    rating: float
    low: float            # 2.5th bootstrap percentile
    high: float           # 97.5th bootstrap percentile
    wins: float
    ties: float
    losses: float

    @property
    def games(self) -> float:
        return self.wins + self.ties + self.losses


def question_matrices(comparisons: Iterable[Comparison], names: Sequence[str]):
    """``(questions, W[q, i, j], N[q, i, j])``: score of i against j and games between them."""
    index = {n: k for k, n in enumerate(names)}
    comparisons = list(comparisons)
    questions = sorted({c.question for c in comparisons})
    qindex = {q: k for k, q in enumerate(questions)}
    n = len(names)
    W = np.zeros((len(questions), n, n))
    N = np.zeros((len(questions), n, n))
    for c in comparisons:
        if not 0.0 <= c.score <= 1.0:
            raise ValueError(f"comparison score must lie in [0, 1], got {c.score}")
        q, i, j = qindex[c.question], index[c.first], index[c.second]
        if i == j:
            raise ValueError(f"a model cannot be compared with itself ({c.first})")
        W[q, i, j] += c.score
        W[q, j, i] += 1.0 - c.score
        N[q, i, j] += 1.0
        N[q, j, i] += 1.0
    return questions, W, N


def fit_bradley_terry(W: np.ndarray, N: np.ndarray, *, l2: float = 1e-3, tol: float = 1e-10,
                      max_iter: int = 100) -> np.ndarray:
    """Maximum-likelihood strengths ``beta`` (natural-log odds) from aggregated ``W``, ``N``.

    Minimises ``-sum_ij W_ij log sigmoid(beta_i - beta_j) + l2/2 |beta|^2`` by damped Newton
    steps (the objective is convex; with ``l2 = 0`` only differences move).
    """
    n = W.shape[0]
    beta = np.zeros(n)

    def loss(b):
        d = b[:, None] - b[None, :]
        return float(np.sum(W * np.logaddexp(0.0, -d)) + 0.5 * l2 * b @ b)

    current = loss(beta)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(beta[:, None] - beta[None, :])))      # P(i beats j)
        grad = np.sum(N * p - W, axis=1) + l2 * beta
        curvature = N * p * (1.0 - p)
        hess = -curvature
        hess[np.diag_indices(n)] = curvature.sum(axis=1) + l2
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]    # min-norm: l2 = 0 leaves a free shift
        t = 1.0
        while t > 1e-8:
            candidate = beta - t * step
            new = loss(candidate)
            if new <= current + 1e-12:
                break
            t *= 0.5
        beta, previous, current = candidate, current, new
        if np.max(np.abs(t * step)) < tol or previous - current < tol * max(1.0, abs(current)):
            break
    return beta


def to_elo(beta: np.ndarray, names: Sequence[str], anchor: str | None = None) -> np.ndarray:
    """Elo-scale ratings, mean 1000 (or ``anchor`` at 1000)."""
    r = beta * ELO_SCALE
    shift = r[list(names).index(anchor)] if anchor is not None else r.mean()
    return r - shift + CENTRE


def rate(comparisons: Iterable[Comparison], names: Sequence[str], *, anchor: str | None = None,
         rounds: int = 1000, seed: int = 0, l2: float = 1e-3) -> list[Rating]:
    """Ratings (best first) with 95% percentile-bootstrap intervals over questions."""
    names, comparisons = list(names), list(comparisons)
    if anchor is not None and anchor not in names:
        raise ValueError(f"anchor {anchor!r} is not one of the models {names}")
    questions, W_q, N_q = question_matrices(comparisons, names)
    if not questions:
        raise ValueError("no comparisons to rate")
    ratings = to_elo(fit_bradley_terry(W_q.sum(0), N_q.sum(0), l2=l2), names, anchor)
    low, high = ratings.copy(), ratings.copy()
    if rounds:
        rng = np.random.default_rng(seed)
        boot = np.empty((rounds, len(names)))
        for b in range(rounds):
            counts = rng.multinomial(len(questions), np.full(len(questions), 1.0 / len(questions)))
            boot[b] = to_elo(fit_bradley_terry(np.tensordot(counts, W_q, 1), np.tensordot(counts, N_q, 1),
                                               l2=l2), names, anchor)
        low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    record = {n: [0.0, 0.0, 0.0] for n in names}        # wins, ties, losses
    for c in comparisons:                               # a fractional score leans one way or ties
        first = 0 if c.score > 0.5 else 2 if c.score < 0.5 else 1
        record[c.first][first] += 1
        record[c.second][2 - first] += 1
    out = [Rating(n, float(ratings[k]), float(low[k]), float(high[k]), *record[n])
           for k, n in enumerate(names)]
    return sorted(out, key=lambda r: -r.rating)
