"""The one JSON-lines reader: line walking, UTF-8 decoding and record parsing, each error a
``DataError`` naming ``FILE:LINE`` (``FILE:LINE: invalid JSON: ...``).

``medjax.data.sources.iter_jsonl`` (training data, with ``on_error: skip``), the benchmark files,
the arena's store and the tiny runs' stand-in data all read through it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from medjax.errors import DataError


def decode_utf8(data: bytes, where, base_offset: int = 0) -> str:
    """``data`` as text; not UTF-8 is a ``DataError`` naming ``where`` and the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = base_offset + e.start
        raise DataError(f"{where}: not UTF-8 at byte offset {offset} (byte 0x{data[e.start]:02x}); "
                        "re-encode the file as UTF-8") from None


def parse_record(text: str, where) -> dict:
    """One line's JSON object (a ``DataError`` naming ``where`` if it is not one)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def iter_lines(path, *, start: int = 0, end: int | None = None,
               first_line: int = 1) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, raw line)`` of the non-blank lines of ``path``, or of those that
    begin in bytes ``[start, end)`` (``start`` at a line start, numbered from ``first_line``),
    without reading the whole file."""
    with open(path, "rb") as f:
        f.seek(start)
        offset, line_no = start, first_line
        for raw in f:
            if end is not None and offset >= end:
                break
            line_offset, offset = offset, offset + len(raw)
            line_no += 1
            if raw.strip():
                yield line_no - 1, line_offset, raw.rstrip(b"\n")


def read_record(path, line_no: int, offset: int, raw: bytes) -> dict:
    """The record of one line from :func:`iter_lines`."""
    where = f"{path}:{line_no}"
    return parse_record(decode_utf8(raw, where, offset), where)


def read_jsonl(path) -> list[dict]:
    """Every record of a JSONL file (the first bad line is a ``DataError`` naming ``FILE:LINE``)."""
    return [read_record(path, *line) for line in iter_lines(Path(path))]
