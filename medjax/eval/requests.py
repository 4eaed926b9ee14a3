"""Prompts and token requests, built exactly as lm-evaluation-harness 0.4.13 builds them.

Context (``lm_eval/api/task.py::fewshot_context``): the task description is a system turn,
each few-shot example is ``question + " " + answer + "\\n\\n"``, then the question. As plain
text the turns are concatenated; with a chat template they become messages (few-shot as
multi-turn, lm-eval's CLI default) rendered with ``add_generation_prompt=True`` and the
target delimiter becomes ``""``.

Tokens (``lm_eval/api/model.py::_encode_pair`` and ``models/huggingface.py::tok_encode``):
trailing whitespace of the context moves onto the continuation; ``context + continuation`` is
encoded as ONE string and split at the length of the encoded context; encoding adds the
tokenizer's special tokens (its BOS when ``add_bos_token``) unless the text already starts
with the BOS text. Inputs longer than ``max_length + 1`` lose tokens from the left.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from medjax.eval.tasks import Task


@dataclass
class Item:
    """One evaluated doc: its prompt, continuations, and (after scoring) its log-likelihoods."""

    task: str
    index: int
    doc: dict
    context: str
    continuations: list[str]          # delimiter + choice, as scored
    choice_texts: list[str]           # bare choices (acc_norm divides by their length)
    gold: int
    requests: list["Request"] = field(default_factory=list)
    generation: str | None = None     # generation-based eval: the model's answer text
    generated_pred: int | None = None # ... and the choice named in it (-1: none)


@dataclass
class Request:
    context_tokens: tuple[int, ...]   # the model input before the continuation
    continuation_tokens: tuple[int, ...]
    loglikelihood: float | None = None
    is_greedy: bool | None = None


# ----------------------------------------------------------------------------- contexts
def sample_fewshot(task: Task, docs: list[dict], index: int, k: int, rng: random.Random) -> list[dict]:
    """lm-eval's samplers with the few-shot pool = the evaluated split (the evaluated doc removed)."""
    if k == 0:
        return []
    doc = docs[index]
    if task.fewshot_sampler == "first_n":
        pool = [d for d in docs if d["_key"] != doc["_key"]]
        return pool[:k]
    picked = [d for d in rng.sample(docs, k + 1) if d["_key"] != doc["_key"]][:k]
    if len(picked) < k:
        picked = rng.sample([d for d in docs if d["_key"] != doc["_key"]], k)
    return picked


def build_context(task: Task, doc: dict, shots: list[dict], choices_of: Callable[[dict], list[str]],
                  chat: Callable[[list[dict]], str] | None = None,
                  fewshot_as_multiturn: bool = True) -> str:
    """The prompt string; ``chat(messages)`` renders a chat template (generation prompt on)."""
    turns: list[tuple[str, str, str]] = []    # (role, content, plain-text delimiter)
    if task.description:
        turns.append(("system", task.description, ""))
    for shot in shots:
        turns.append(("user", task.prompt(shot), " "))
        turns.append(("assistant", choices_of(shot)[task.gold(shot)], "\n\n"))
    turns.append(("user", task.prompt(doc), ""))
    if chat is None:
        return "".join(content + delim for _, content, delim in turns)
    system = [t for t in turns if t[0] == "system"]
    rest = [t for t in turns if t[0] != "system"]
    if fewshot_as_multiturn:
        messages = [{"role": r, "content": c} for r, c, _ in system + rest]
    else:
        merged = "".join(c + d for _, c, d in rest[:-1]) + rest[-1][1]
        messages = [{"role": r, "content": c} for r, c, _ in system] + [{"role": "user", "content": merged}]
    return chat(messages)


# ----------------------------------------------------------------------------- tokens
class LmEvalEncoder:
    """HFLM's ``tok_encode``/``_encode_pair`` on a medjax Tokenizer (default ``add_bos_token``)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        self.prefix_token_id = prefix_id
        self.prefix_text = (tokenizer.decode([prefix_id], skip_special_tokens=False)
                            if prefix_id is not None else None)
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        special = not (self.prefix_text and text.startswith(self.prefix_text))
        return self.tokenizer.encode(text, add_special_tokens=special)

    def encode_cached(self, text: str) -> list[int]:
        """``encode`` memoised: the same context is encoded once for all its choices."""
        if text not in self._cache:
            self._cache[text] = self.encode(text)
        return self._cache[text]

    def clear(self) -> None:
        self._cache.clear()

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.tokenizer.encode(continuation, add_special_tokens=False)
            if self.prefix_token_id != cont[0]:
                return [self.prefix_token_id], cont
            return cont[:1], cont[1:]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        context_enc = self.encode_cached(context)
        return context_enc, whole[len(context_enc):]

    def request(self, context: str, continuation: str) -> Request:
        """Token request with lm-eval's left truncation: the model sees
        ``(ctx + cont)[-(max_length + 1):][:-1]`` and scores the last ``len(cont)`` tokens."""
        context_enc, cont_enc = self.encode_pair(context, continuation)
        if not cont_enc:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after the split")
        whole = (context_enc + cont_enc)[-(self.max_length + 1):]
        return Request(tuple(whole[: len(whole) - len(cont_enc)]), tuple(cont_enc))


def build_items(task: Task, docs: list[dict], encoder: LmEvalEncoder, *, num_fewshot: int = 0,
                score: str = "letter", chat: Callable | None = None, fewshot_as_multiturn: bool = True,
                fewshot_seed: int = 1234, limit: int | None = None) -> list[Item]:
    """Items (prompt + token requests) for the first ``limit`` docs of ``task``."""
    choices_of = task.choices if score == "letter" else task.full_answer_choices
    delimiter = "" if chat is not None else " "
    rng = random.Random(fewshot_seed)
    items = []
    for index in range(len(docs) if limit is None else min(limit, len(docs))):
        doc = docs[index]
        shots = sample_fewshot(task, docs, index, num_fewshot, rng)
        context = build_context(task, doc, shots, choices_of, chat, fewshot_as_multiturn)
        choices = choices_of(doc)
        item = Item(task.name, index, doc, context, [delimiter + c for c in choices], choices,
                    task.gold(doc))
        item.requests = [encoder.request(context, cont) for cont in item.continuations]
        items.append(item)
    return items
