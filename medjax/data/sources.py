"""Reading raw records from files (JSONL, JSON, Parquet, plain text) and prepared TFDS datasets.

A file source becomes a list of ``Row(where, record)``: ``where`` is ``"FILE:LINE"`` (JSONL),
``"FILE:item N"`` (JSON array), ``"FILE:row N"`` (Parquet) or ``"FILE"`` (text: one document per
file), so every later error can name the exact input. Bad input raises ``DataError`` naming file,
line and field; with ``on_error="skip"`` the row is dropped and recorded in ``SkipLog``.
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from medjax.data.jsonl import decode_utf8, iter_lines, read_record
from medjax.errors import DataError
from medjax.paths import resolve_path

TEXT_SUFFIXES = (".txt", ".md", ".text")
SUFFIXES = (".jsonl", ".json", ".parquet") + TEXT_SUFFIXES


class Row(NamedTuple):
    where: str
    record: Any


@dataclass
class SkipLog:
    """Rows dropped under ``on_error: skip``: a count and the first few reasons."""
    count: int = 0
    examples: list = field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def summary(self) -> str:
        if not self.count:
            return "no rows skipped"
        return f"skipped {self.count} bad row(s), e.g.: " + "; ".join(self.examples)


def expand_paths(pattern: str) -> list[Path]:
    """A file, a directory (all data files below it), a glob or a ``pkg://package/file`` → sorted files."""
    path = resolve_path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"no data files match {pattern!r} (looked for {', '.join(SUFFIXES)})")
    return files


def read_rows(pattern: str, *, on_error: str = "raise", skips: SkipLog | None = None) -> list[Row]:
    rows: list[Row] = []
    for path in expand_paths(pattern):
        rows.extend(read_file(path, on_error=on_error, skips=skips))
    return rows


def read_file(path: Path, *, on_error: str = "raise", skips: SkipLog | None = None) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, on_error, skips if skips is not None else SkipLog())
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: only for parquet sources

        table = pq.read_table(path)
        return [Row(f"{path}:row {i}", rec) for i, rec in enumerate(table.to_pylist())]
    if suffix in TEXT_SUFFIXES:
        return [Row(str(path), {"text": decode_utf8(path.read_bytes(), path)})]
    raise DataError(f"{path}: unsupported file type {suffix!r} (use one of {', '.join(SUFFIXES)})")


def _read_jsonl(path: Path, on_error: str, skips: SkipLog) -> list[Row]:
    return list(iter_jsonl(path, on_error=on_error, skips=skips))


def iter_jsonl(path: Path, *, on_error: str = "raise", skips: SkipLog | None = None, start: int = 0,
               end: int | None = None, first_line: int = 1):
    """Stream the rows of a JSON-lines file, or of the lines that begin in bytes ``[start, end)``
    (``start`` at a line start, numbered from ``first_line``), without reading the whole file."""
    skips = skips if skips is not None else SkipLog()
    for line_no, offset, raw in iter_lines(path, start=start, end=end, first_line=first_line):
        try:
            record = read_record(path, line_no, offset, raw)
        except DataError as e:
            if on_error != "skip":
                raise
            skips.add(str(e))
            continue
        yield Row(f"{path}:{line_no}", record)


def _read_json(path: Path) -> list[Row]:
    text = decode_utf8(path.read_bytes(), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of records (or an object holding one array)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return [Row(f"{path}:item {i}", rec) for i, rec in enumerate(data)]


# ----------------------------------------------------------------------------- TFDS
class TfdsRecords:
    """Random access over a prepared TFDS split (array_record), records decoded to str/lists."""

    def __init__(self, name: str, split: str, data_dir: str | None, manual_dir: str | None = None):
        from medjax.data import tfds_builders  # registers the builders; imports tfds lazily

        self.name, self.split = name, split
        self._source = tfds_builders.data_source(name, split=split, data_dir=data_dir, manual_dir=manual_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Row:
        record = {k: _to_python(v) for k, v in self._source[index].items()}
        return Row(f"tfds:{self.name}/{self.split}:record {index}", record)


def _to_python(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_to_python(v) for v in value]
    return value
