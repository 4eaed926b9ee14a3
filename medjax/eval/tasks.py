"""Declarative medical MCQA tasks, prompts identical to lm-evaluation-harness 0.4.13, and
TruthfulQA's multiple choice as its original release defines it (``truthfulqa.py``).

A task turns a *canonical doc* (the dict the readers in ``readers.py`` produce:
``question``, ``options`` (list of option texts), ``label`` (gold index), ``subject``
(or None), plus ``contexts`` for PubMedQA) into a prompt, a list of answer choices and a
gold index. Adding a task is one ``Task(...)`` entry in ``TASKS``.

Groups (``mmlu_medical``, ``multimedqa``) aggregate their members weighted by size, as
lm-eval's ``aggregate_metric_list: weight_by_size: True`` does.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from medjax.errors import ConfigError

from medjax.eval import truthfulqa

LETTERS = ("A", "B", "C", "D", "E")


def _letters(doc: dict) -> list[str]:
    return list(LETTERS[: len(doc["options"])])


def _options_block(doc: dict) -> str:
    return "".join(f"{letter}. {text}\n" for letter, text in zip(LETTERS, doc["options"]))


def medqa_prompt(doc: dict) -> str:
    """lm_eval/tasks/medqa/preprocess_medqa.py::doc_to_text."""
    return f"Question: {doc['question']}\n{_options_block(doc)}Answer:"


def medmcqa_prompt(doc: dict) -> str:
    """lm_eval/tasks/medmcqa/utils_medmcqa.py::doc_to_text."""
    return f"Question: {doc['question']}\nChoices:\n{_options_block(doc)}Answer:"


def pubmedqa_prompt(doc: dict) -> str:
    """lm_eval/tasks/pubmedqa/preprocess_pubmedqa.py::doc_to_text."""
    return "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(doc["contexts"]), doc["question"])


def mmlu_prompt(doc: dict) -> str:
    """lm_eval/tasks/mmlu/default/_default_template_yaml::doc_to_text."""
    return f"{doc['question'].strip()}\n{_options_block(doc)}Answer:"


@dataclass(frozen=True)
class Task:
    """One benchmark: where its docs come from and how a doc becomes a scored question.

    ``choices(doc)`` are the continuation strings scored after the target delimiter
    (letters by default); ``full_answer_choices(doc)`` are used with ``--score full_answer``.
    """

    name: str
    dataset: str                          # reader key in readers.READERS
    prompt: Callable[[dict], str]
    choices: Callable[[dict], list[str]] = _letters
    full_answer_choices: Callable[[dict], list[str]] = lambda doc: list(doc["options"])
    description: str = ""                 # prepended to every prompt (system turn with chat)
    subject: str | None = None            # keep only docs of this subject (MMLU subsets)
    subjects: tuple[str, ...] = ()        # ... or of these subjects (TruthfulQA categories)
    fewshot_sampler: str = "default"      # lm-eval sampler: "default" (random) | "first_n"
    metrics: tuple[str, ...] = ("acc", "acc_norm")

    def gold(self, doc: dict) -> int:
        return int(doc["label"])


MMLU_MEDICAL_SUBJECTS = (
    "anatomy", "clinical_knowledge", "college_biology", "college_medicine",
    "medical_genetics", "professional_medicine",
)


def _mmlu(subject: str) -> Task:
    words = subject.replace("_", " ")
    return Task(
        name=f"mmlu_{subject}", dataset="mmlu", prompt=mmlu_prompt, subject=subject,
        description=f"The following are multiple choice questions (with answers) about {words}.\n\n",
        fewshot_sampler="first_n", metrics=("acc",),
    )


TASKS: dict[str, Task] = {
    "medqa_4options": Task(name="medqa_4options", dataset="medqa", prompt=medqa_prompt),
    "medmcqa": Task(name="medmcqa", dataset="medmcqa", prompt=medmcqa_prompt),
    "pubmedqa": Task(
        name="pubmedqa", dataset="pubmedqa", prompt=pubmedqa_prompt,
        choices=lambda doc: ["yes", "no", "maybe"],
        full_answer_choices=lambda doc: ["yes", "no", "maybe"], metrics=("acc",),
    ),
    **{f"mmlu_{s}": _mmlu(s) for s in MMLU_MEDICAL_SUBJECTS},
}


def _truthfulqa(metric: str, subset: str = "", subjects: tuple[str, ...] = ()) -> Task:
    """Every answer is a choice (correct ones first); the primer is the description."""
    answers = lambda doc: list(doc["options"])  # noqa: E731
    return Task(name=f"truthfulqa_orig_{subset}{metric}", dataset="truthfulqa", prompt=truthfulqa.prompt,
                choices=answers, full_answer_choices=answers, description=truthfulqa.PRIMERS["qa"],
                subjects=subjects, metrics=(metric,))


TRUTHFULQA_TASKS = {t.name: t for t in (
    *(_truthfulqa(m) for m in truthfulqa.METRICS),
    *(_truthfulqa(m, "medical_", truthfulqa.MEDICAL_CATEGORIES) for m in truthfulqa.METRICS))}
TASKS.update(TRUTHFULQA_TASKS)

# lm_eval/tasks/benchmarks/multimedqa/multimedqa.yaml lists these members.
GROUPS: dict[str, tuple[str, ...]] = {
    "mmlu_medical": tuple(f"mmlu_{s}" for s in MMLU_MEDICAL_SUBJECTS),
    "multimedqa": ("pubmedqa", "medmcqa", "medqa_4options",
                   *(f"mmlu_{s}" for s in MMLU_MEDICAL_SUBJECTS)),
    "truthfulqa_orig": tuple(f"truthfulqa_orig_{m}" for m in truthfulqa.METRICS),
    "truthfulqa_orig_medical": tuple(f"truthfulqa_orig_medical_{m}" for m in truthfulqa.METRICS),
}

ALIASES = {"medqa": "medqa_4options"}




def valid_names() -> list[str]:
    return sorted(TASKS) + sorted(GROUPS)


def resolve(names: str | list[str]) -> tuple[list[Task], dict[str, tuple[str, ...]]]:
    """Comma list of task/group names → (tasks in first-seen order, groups requested).

    Raises ConfigError listing the valid names (and the closest one).
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    tasks: dict[str, Task] = {}
    groups: dict[str, tuple[str, ...]] = {}
    for raw in names:
        name = ALIASES.get(raw.strip(), raw.strip())
        if name in GROUPS:
            groups[name] = GROUPS[name]
            members = GROUPS[name]
        elif name in TASKS:
            members = (name,)
        else:
            close = difflib.get_close_matches(name, valid_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown task {name!r}{hint}; valid tasks: {', '.join(valid_names())}")
        for member in members:
            tasks.setdefault(member, TASKS[member])
    if not tasks:
        raise ConfigError(f"no task given; valid tasks: {', '.join(valid_names())}")
    return list(tasks.values()), groups
