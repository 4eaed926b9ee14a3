"""Each contestant answers every question: batched KV-cache generation with its own chat template.

Questions are cut, in file order, into batches of ``batch_size`` (the last one padded with
copies so every batch has one compiled shape); batch ``k`` samples with seed ``seed + k``, so
an answer depends only on the settings and the question file, not on what a previous
(interrupted) run already did. A batch whose answers are all in ``answers.jsonl`` is skipped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from medjax.arena.contestants import Contestant
from medjax.arena.questions import Question
from medjax.arena.store import JsonlStore, record_key
from medjax.eval.generate import SamplingParams


@dataclass(frozen=True)
class AnswerSettings:
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 8
    system: str | None = None          # optional system turn before each question

    def describe(self) -> dict:
        return {"sampling": dataclasses.asdict(self.sampling), "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "batch_size": self.batch_size, "system": self.system}


def answer_key(contestant: Contestant, question: Question, settings: AnswerSettings) -> str:
    template = [contestant.chat_template] if contestant.chat_template else []   # keys of older runs hold
    return record_key("answer", contestant.name, contestant.path, *template, question.question,
                      settings.describe())


def batches(questions: list[Question], settings: AnswerSettings) -> list[list[Question]]:
    size = settings.batch_size
    return [questions[i:i + size] for i in range(0, len(questions), size)]


def missing(contestant, questions, settings, store: JsonlStore) -> list[Question]:
    return [q for q in questions if answer_key(contestant, q, settings) not in store]


def chat_prompt(tokenizer, question: Question, settings: AnswerSettings,
                chat_template: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": settings.system}] if settings.system else []
    messages.append({"role": "user", "content": question.question})
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                          chat_template=chat_template))


def generate_answers(contestant: Contestant, model, tokenizer, questions: list[Question],
                     settings: AnswerSettings, store: JsonlStore, bar=None) -> int:
    """Answer the questions not yet in ``store``; returns how many batches were generated."""
    from medjax.eval.generate import Generator, strip_stop

    generator = Generator(model, settings.sampling)
    stop_ids = tokenizer.stop_ids
    done = 0
    for k, batch in enumerate(batches(questions, settings)):
        keys = [answer_key(contestant, q, settings) for q in batch]
        if all(key in store for key in keys):
            continue
        prompts = [chat_prompt(tokenizer, q, settings, contestant.chat_template) for q in batch]
        prompts += [prompts[-1]] * (settings.batch_size - len(prompts))   # one compiled shape
        outs = generator.generate(prompts, max_new_tokens=settings.max_new_tokens, stop_ids=stop_ids,
                                  seed=settings.seed + k, pad_id=tokenizer.pad_id)
        records = []
        for q, key, ids in zip(batch, keys, outs):
            stopped = bool(ids) and ids[-1] in stop_ids
            records.append({"key": key, "model": contestant.name, "path": contestant.path,
                            "question_id": q.id, "question": q.question,
                            "chat_template": contestant.chat_template,
                            "answer": tokenizer.decode(strip_stop(ids, stop_ids)).strip(),
                            "new_tokens": len(ids), "stopped": stopped, "batch": k,
                            "batch_seed": settings.seed + k, **settings.describe()})
        store.append(records)
        done += 1
        if bar is not None:
            bar.update(len(batch))
    return done
