"""Append-only JSONL records keyed by a hash of their inputs: the audit log and the resume cache.

Each record carries ``key``, a hash of everything that determines it (model path, prompt,
sampling, seed... for an answer; judge path and the full judge prompt for a judgement). On
start the file is read back and a record whose key is present is not recomputed, so a killed
run resumes where it stopped and a changed setting recomputes only what it affects. Records
are appended a batch at a time with ``flush`` + ``fsync``; a line torn by a kill is cut off
before appending.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from medjax.data.jsonl import iter_lines, read_record
from medjax.errors import DataError


def record_key(*parts) -> str:
    """A stable hash of JSON-able ``parts``."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class JsonlStore:
    """``key -> record`` read from ``path`` (later lines win), appended to as work finishes."""

    def __init__(self, path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):                  # torn last line from a kill: drop it
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        for line_no, offset, raw in iter_lines(self.path):
            record = read_record(self.path, line_no, offset, raw)
            if "key" not in record:
                raise DataError(f"{self.path}:{line_no}: not a record this tool wrote; "
                                "choose another --out or delete the file")
            self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> dict:
        return self.records[key]

    def __len__(self) -> int:
        return len(self.records)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[r["key"]] = r
