"""The decontamination scan over a run's training sources: planned as chunks (byte ranges of
JSON-lines files cut at line starts, whole other files, TFDS ranges) and run on a process pool,
each worker holding the ``BenchmarkIndex`` (``medjax.data.decontaminate``) once, so the data is
streamed, never held.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple

from medjax.data.decontaminate import BenchmarkIndex, scan_rows
from medjax.data.sources import Row, TfdsRecords, expand_paths, iter_jsonl, read_file
from medjax.errors import DataError

_CHUNK_BYTES = 8 << 20


class Chunk(NamedTuple):
    source: str                 # the configured source (path pattern or tfds:name/split)
    kind: str                   # jsonl | file | tfds
    path: str
    start: int = 0
    end: int | None = None
    first_line: int = 1
    tfds: tuple = ()            # (name, split, data_dir, manual_dir)


def source_entries(data_cfg) -> list[dict]:
    """The run's training sources, as ``resolve_sources`` reads them."""
    if data_cfg.sources:
        return list(data_cfg.sources)
    if data_cfg.train is not None:
        return [{"path": data_cfg.train}]
    raise DataError("no training data: set data.train (file/glob/dir) or data.sources")


def plan_chunks(entries: list[dict], chunk_bytes: int = _CHUNK_BYTES) -> list[Chunk]:
    """Byte ranges of JSON-lines files (cut at line starts, numbered), whole other files, TFDS ranges."""
    chunks = []
    for entry in entries:
        if "tfds" in entry:
            split = entry.get("split", "train")
            name = f"tfds:{entry['tfds']}/{split}"
            spec = (entry["tfds"], split, entry.get("data_dir"), entry.get("manual_dir"))
            total = len(TfdsRecords(*spec))
            chunks += [Chunk(name, "tfds", name, s, min(s + 50_000, total), tfds=spec)
                       for s in range(0, total, 50_000)]
            continue
        for path in expand_paths(entry["path"]):
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError as e:
                raise DataError(f"{path}: cannot read training source {entry['path']!r} ({e.strerror})") from None
            if path.suffix.lower() != ".jsonl":
                chunks.append(Chunk(entry["path"], "file", str(path)))
                continue
            chunks += _jsonl_chunks(entry["path"], path, chunk_bytes)
    return chunks


def _jsonl_chunks(source: str, path: Path, chunk_bytes: int) -> list[Chunk]:
    size = path.stat().st_size
    chunks, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            if f.tell() < size:
                f.readline()                    # to the next line start
            end = f.tell()
            chunks.append(Chunk(source, "jsonl", str(path), start, end, line))
            line += _count_newlines(f, start, end)
            start = end
    return chunks


def _count_newlines(f, start: int, end: int) -> int:
    f.seek(start)
    count, left = 0, end - start
    while left > 0:
        block = f.read(min(left, 8 << 20))
        count, left = count + block.count(b"\n"), left - len(block)
    return count


def chunk_rows(chunk: Chunk, on_error: str = "raise") -> Iterator[Row]:
    if chunk.kind == "jsonl":
        return iter_jsonl(Path(chunk.path), on_error=on_error, start=chunk.start, end=chunk.end,
                          first_line=chunk.first_line)
    if chunk.kind == "tfds":
        records = TfdsRecords(*chunk.tfds)
        return (records[i] for i in range(chunk.start, chunk.end))
    return iter(read_file(Path(chunk.path), on_error=on_error))


_WORKER_INDEX: BenchmarkIndex | None = None


def _init_worker(index: BenchmarkIndex) -> None:
    global _WORKER_INDEX
    _WORKER_INDEX = index


def _scan_chunk(chunk: Chunk, on_error: str, index: BenchmarkIndex | None = None):
    matches, rows, nbytes = scan_rows(index or _WORKER_INDEX, chunk_rows(chunk, on_error))
    return chunk.source, matches, rows, nbytes


def scan_sources(index: BenchmarkIndex, chunks: list[Chunk], *, workers: int | None = None,
                 on_error: str = "raise") -> dict[str, dict]:
    """``{source: {"rows", "bytes", "matches": [Match]}}`` over ``chunks``, on ``workers`` processes
    (default: every core; 1 = in this process)."""
    workers = workers or os.cpu_count() or 1
    out = {c.source: {"rows": 0, "bytes": 0, "matches": []} for c in chunks}
    if workers == 1 or len(chunks) == 1:
        results = (_scan_chunk(c, on_error, index) for c in chunks)
        return _collect(out, results)
    import multiprocessing
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(index,)) as pool:
        return _collect(out, pool.map(_scan_chunk, chunks, [on_error] * len(chunks)))


def _collect(out, results):
    for source, matches, rows, nbytes in results:
        out[source]["rows"] += rows
        out[source]["bytes"] += nbytes
        out[source]["matches"] += matches
    return out
