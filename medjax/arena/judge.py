"""Pairwise judging: every question, every pair of models, both orders; verdict from log-probs.

For models ``a`` and ``b`` the judge sees (a, b) and, separately, (b, a), so a judge that
prefers whichever answer comes first gives each model one win and one loss and the bias
cancels. The rubric (rubric.py) is rendered, wrapped in the judge's chat template with the
generation prompt, and the judge's log-probability of each verdict (``A``, ``B``, ``tie``,
each tokenized on its own after the prompt, so exactly what the judge would generate next)
is read off one forward pass (``medjax.eval.scorer.score_batch``). No text is generated or
parsed. The verdict is the most probable label; the first answer scores 1 (A), 0 (B) or
0.5 (tie). The probabilities (normalised over the labels) are kept in the record, so the
``expected`` scoring, P(A) + P(tie)/2, can rate the same judgements without judging again.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np

from medjax.errors import CheckpointError, ConfigError
from medjax.arena.questions import Question
from medjax.arena.rubric import VERDICTS, Rubric
from medjax.arena.store import JsonlStore, record_key

SCORE_OF_VERDICT = {"A": 1.0, "B": 0.0, "tie": 0.5}
SCORING = ("verdict", "expected")
# A judge that reads the answers names the same winner whichever is shown first; one that ignores
# them and flips a coin agrees with itself on half the pairs; one that always picks the answer
# shown first, on none. Below this agreement the verdicts follow the order, not the answers.
MIN_ORDERS_AGREE = 0.5


@dataclass(frozen=True)
class Pairing:
    question: Question
    first: str
    second: str


def pairings(questions: Sequence[Question], names: Sequence[str], *, both_orders: bool = True) -> list[Pairing]:
    """Each question × unordered pair of models, in both presentation orders."""
    out = []
    for q in questions:
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                out.append(Pairing(q, a, b))
                if both_orders:
                    out.append(Pairing(q, b, a))
    return out


class Judge:
    """A judge model: chat-wrapped prompt → log-probabilities of the verdict labels."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, chat_template: str | None = None):
        import jax
        from flax import nnx

        from medjax.eval.scorer import score_batch
        from medjax.ops.target import compiler_options

        self.tokenizer, self.batch_size, self.chat_template = tokenizer, batch_size, chat_template
        self.max_length = model.config.max_position_embeddings
        self.verdict_ids = [tokenizer.encode(v) for v in VERDICTS]
        if len({tuple(ids) for ids in self.verdict_ids}) != len(VERDICTS) or not all(self.verdict_ids):
            raise CheckpointError(f"judge tokenizer: the verdict labels {VERDICTS} do not encode to "
                             f"distinct token sequences ({self.verdict_ids})")
        graphdef, self.state = nnx.split(model)
        self._score = jax.jit(partial(score_batch, graphdef),
                              compiler_options=compiler_options(self.state))

    def prompt_ids(self, text: str) -> list[int]:
        chat = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                  add_generation_prompt=True, chat_template=self.chat_template)
        return self.tokenizer.encode(chat)

    def logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """``[len(prompts), len(VERDICTS)]`` summed log-probs of each label after each prompt."""
        from medjax.eval.scorer import bucket

        M = max(len(ids) for ids in self.verdict_ids)
        K = len(self.verdict_ids)
        cont_KM = np.zeros((K, M), np.int32)
        for k, ids in enumerate(self.verdict_ids):
            cont_KM[k, :len(ids)] = ids
        cont_len_K = np.array([len(ids) for ids in self.verdict_ids], np.int32)
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start:start + self.batch_size])
            longest = max(len(p) for p in chunk)
            if longest + M > self.max_length:
                raise ConfigError(f"judge prompt of {longest} tokens exceeds the judge's context of "
                                 f"{self.max_length}; lower --max-new-tokens")
            T = min(bucket(longest), self.max_length)
            B = self.batch_size
            ids_BT = np.full((B, T), self.tokenizer.pad_id, np.int32)
            ctx_len_B = np.full((B,), len(chunk[0]), np.int32)
            for b, p in enumerate(chunk + [chunk[0]] * (B - len(chunk))):
                ids_BT[b, :len(p)] = p
                ctx_len_B[b] = len(p)
            total_BK, _ = self._score(self.state, ids_BT, ctx_len_B, np.broadcast_to(cont_KM, (B, K, M)).copy(),
                                      np.broadcast_to(cont_len_K, (B, K)).copy())
            out.append(np.asarray(total_BK)[:len(chunk)])
        return np.concatenate(out, axis=0)


def verdict_of(logprobs_K: np.ndarray, verdicts: Sequence[str] = VERDICTS) -> tuple[str, dict]:
    """The most probable label and the labels' probabilities normalised over the labels."""
    p = np.exp(logprobs_K - np.max(logprobs_K))
    p = p / p.sum()
    return verdicts[int(np.argmax(logprobs_K))], {v: float(x) for v, x in zip(verdicts, p)}


def judge_key(judge_path: str, pair: Pairing, prompt_text: str, chat_template: str | None = None) -> str:
    template = [chat_template] if chat_template else []
    return record_key("judgement", judge_path, *template, pair.question.id, pair.first, pair.second,
                      prompt_text, list(VERDICTS))


def pending(pairs: Sequence[Pairing], answer_of, rubric: Rubric, judge_path: str,
            store: JsonlStore, chat_template: str | None = None) -> tuple[list[str], list[tuple[Pairing, str, str]]]:
    """``(keys of all pairings, [(pairing, key, prompt text)] not yet in store)``.
    ``answer_of(model, question) -> str``."""
    keys, todo = [], []
    for pair in pairs:
        text = rubric.render(pair.question.question, pair.question.reference,
                             answer_of(pair.first, pair.question), answer_of(pair.second, pair.question))
        key = judge_key(judge_path, pair, text, chat_template)
        keys.append(key)
        if key not in store:
            todo.append((pair, key, text))
    return keys, todo


def run_judging(todo: Sequence[tuple[Pairing, str, str]], judge, judge_path: str, store: JsonlStore,
                *, bar=None) -> int:
    """Judge ``todo`` (from :func:`pending`), appending records a batch at a time; ``judge`` has
    ``prompt_ids``, ``logprobs`` and ``batch_size`` (a :class:`Judge`)."""
    work = sorted(((pair, key, judge.prompt_ids(text)) for pair, key, text in todo),
                  key=lambda t: -len(t[2]))          # similar lengths share a batch (less padding)
    for start in range(0, len(work), judge.batch_size):
        part = work[start:start + judge.batch_size]
        lp = judge.logprobs([ids for _, _, ids in part])
        records = []
        for (pair, key, ids), lp_K in zip(part, lp):
            verdict, probs = verdict_of(lp_K)
            records.append({"key": key, "question_id": pair.question.id, "first": pair.first,
                            "second": pair.second, "verdict": verdict,
                            "winner": {"A": pair.first, "B": pair.second}.get(verdict, "tie"),
                            "score_first": SCORE_OF_VERDICT[verdict], "probs": probs,
                            "logprobs": {v: float(x) for v, x in zip(VERDICTS, lp_K)},
                            "prompt_tokens": len(ids), "judge": judge_path})
        store.append(records)
        if bar is not None:
            bar.update(len(part))
    return len(work)


def first_score(record: dict, scoring: str = "verdict") -> float:
    """The first-shown model's score in a judgement record: ``verdict`` = 1 / 0.5 / 0 from the
    most probable label; ``expected`` = P(A) + P(tie) / 2 (probabilities over the labels)."""
    if scoring == "verdict":
        return record["score_first"]
    if scoring == "expected":
        return record["probs"]["A"] + 0.5 * record["probs"]["tie"]
    raise ValueError(f"scoring must be one of {SCORING}, got {scoring!r}")


def position_stats(records: Sequence[dict]) -> dict:
    """How often each label won, and how often both orders of a pair named the same winner."""
    n = max(len(records), 1)
    share = {v: sum(r["verdict"] == v for r in records) / n for v in VERDICTS}
    by_pair: dict[tuple, list[str]] = {}
    for r in records:
        by_pair.setdefault((r["question_id"],) + tuple(sorted((r["first"], r["second"]))), []).append(r["winner"])
    both = [w for w in by_pair.values() if len(w) == 2]
    agree = sum(w[0] == w[1] for w in both) / len(both) if both else None
    return {"verdict_share": share, "orders_agree": agree, "pairs_in_both_orders": len(both)}


def order_warning(stats: dict) -> str | None:
    """The warning for a judge whose verdicts follow the presentation order (``stats`` from
    :func:`position_stats`): both orders named the same winner in under ``MIN_ORDERS_AGREE`` of
    the pairs judged both ways. None when the judge passes (or no pair was judged both ways)."""
    agree = stats.get("orders_agree")
    if agree is None or agree >= MIN_ORDERS_AGREE:
        return None
    share = stats["verdict_share"]
    return (f"degenerate judge: the two presentation orders named the same winner in {agree:.0%} of "
            f"{stats['pairs_in_both_orders']} pairs (below {MIN_ORDERS_AGREE:.0%}, a coin flip's rate; "
            f"verdicts: {share['A']:.0%} the answer shown first, {share['B']:.0%} the second, "
            f"{share['tie']:.0%} tie): the verdicts follow the order, not the answers, so the ratings "
            f"carry no information")
