"""The strict JSONL reader: every row of a small JSONL file, a bad line a DataError naming ``file:line``."""
from __future__ import annotations

import json

from medjax.errors import DataError


def read_jsonl(path) -> list[dict]:
    """Rows of a JSONL file; a bad line is an error naming ``file:line``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON: {e}") from None
    return rows

