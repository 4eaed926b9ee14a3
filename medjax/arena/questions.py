"""The question set: JSONL rows with ``question`` and an optional ``reference`` (and ``id``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medjax.errors import DataError

DEFAULT_QUESTIONS = "pkg://medjax/assets/arena/medical_questions.jsonl"


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    reference: str | None = None


def load_questions(path) -> list[Question]:
    """Rows of a JSONL file; a row without a text ``question`` is an error naming file:line."""
    from medjax.data.sources import read_file
    from medjax.paths import resolve_path

    file = resolve_path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such questions file")
    if file.suffix != ".jsonl":
        raise DataError(f"{file}: questions must be a .jsonl file (one JSON object per line)")
    questions, seen = [], {}
    for row in read_file(Path(file)):
        record = row.record
        text = record.get("question")
        if not isinstance(text, str) or not text.strip():
            problem = "has no 'question'" if text is None else "has an empty or non-text 'question'"
            raise DataError(f"{row.where}: row {problem} (fields: {sorted(record)})")
        reference = record.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise DataError(f"{row.where}: 'reference' must be text, got {type(reference).__name__}")
        qid = str(record.get("id", row.where.rsplit(":", 1)[-1]))
        if qid in seen:
            raise DataError(f"{row.where}: id {qid!r} repeats the row at {seen[qid]}")
        seen[qid] = row.where
        questions.append(Question(qid, text.strip(), reference.strip() if reference else None))
    if not questions:
        raise DataError(f"{file}: no questions")
    return questions
