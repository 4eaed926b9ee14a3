"""``make_dataset``: sources → shuffle/mix/epochs → tokenize → fit length → pack → global batch → host rows.

Every process builds the same global batch stream (the order is a function of the seed; skipped
rows, length drops, split examples and packing are decided on the whole stream) and keeps its
block of rows of each global batch (host p: rows ``p·b .. p·b + b - 1``, ``b`` = rows per host,
the split ``sharding.local_batch_rows`` gives a process). So the global batch at every step holds
the same rows in the same order whatever the process count, and the iterator state (grain's
counters of that one stream, the resume point) is the same on every process and in every layout.
The price: each process tokenizes and packs the whole batch, not only its rows.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import grain
import numpy as np

from medjax.data.examples import KEYS, encode_rendered, encode_rendered_batch, fit_length, pad_row, stack_columns, unstack_columns
from medjax.data.formats import FieldError, Renderer
from medjax.data.sources import DataError, Row, SkipLog, TfdsRecords, read_rows


# Rows tokenized per batched tokenizer call (and per prefetch element), and how far ahead one
# background thread works: grain's default (16 threads x 500 elements) spends more time switching
# threads and polling its buffer than tokenizing when every element is GIL-bound Python.
ENCODE_GROUP = 16
PREFETCH = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


@dataclass
class Source:
    name: str
    rows: Sequence[Row]
    weight: float
    renderer: Renderer


def resolve_sources(data_cfg, tokenizer, *, split: str = "train", skips: SkipLog | None = None,
                    benchmarks_dir=None) -> list[Source]:
    """Read and validate every configured source (files eagerly, TFDS lazily). For the training
    split, rows overlapping ``data.decontaminate``'s test items (in ``benchmarks_dir``) are dropped."""
    skips = skips if skips is not None else SkipLog()
    dropped = set()
    if data_cfg.decontaminate and split == "train":
        from medjax.data.contamination import overlapping_rows  # lazy: reads the eval test sets
        dropped = overlapping_rows(data_cfg, benchmarks_dir)
    holdout = data_cfg.eval is None and data_cfg.heldout_rows > 0
    if holdout and (data_cfg.sources or data_cfg.train is None):
        raise DataError("data.heldout_rows splits a single data.train source; set data.eval for mixtures")
    if split == "eval" and not holdout:
        if data_cfg.eval is None:
            raise DataError("data.eval is not set: give a file, glob or directory of evaluation data")
        entries = [{"path": data_cfg.eval}]
    elif data_cfg.sources:
        entries = list(data_cfg.sources)
    elif data_cfg.train is not None:
        entries = [{"path": data_cfg.train}]
    else:
        raise DataError("no training data: set data.train (file/glob/dir) or data.sources")
    sources = []
    for entry in entries:
        renderer = Renderer(entry.get("format", data_cfg.format), tokenizer,
                            fields={**data_cfg.fields, **entry.get("fields", {})},
                            prompt_style=data_cfg.prompt_style, chat_template=data_cfg.chat_template,
                            system_prompt=data_cfg.system_prompt, train_on_prompt=data_cfg.train_on_prompt)
        if "tfds" in entry:
            rows = TfdsRecords(entry["tfds"], entry.get("split", "train"), entry.get("data_dir"),
                               entry.get("manual_dir"))
            name = f"tfds:{entry['tfds']}/{rows.split}"
            if dropped:
                rows = RowSubset(rows, [i for i in range(len(rows)) if f"{name}:record {i}" not in dropped])
        else:
            rows = [row for row in read_rows(entry["path"], on_error=data_cfg.on_error, skips=skips)
                    if _valid(row, renderer, data_cfg.on_error, skips)]
            name = entry["path"]
            rows = _select_rows(rows, data_cfg, split, name) if holdout or data_cfg.max_rows else rows
            if dropped:   # after the held-out split, which stays the rows it is without filtering
                rows = [row for row in rows if row.where not in dropped]
        if len(rows) == 0:
            raise DataError(f"{name}: no usable examples ({skips.summary()})")
        sources.append(Source(name, rows, float(entry.get("weight", 1.0)), renderer))
    return sources


class RowSubset:
    """Random access to the rows of ``rows`` at ``indices`` (a decontaminated TFDS split)."""

    def __init__(self, rows, indices: list[int]):
        self.rows, self.indices = rows, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.rows[self.indices[index]]


def _select_rows(rows: list[Row], data_cfg, split: str, name: str) -> list[Row]:
    """The held-out tail (``split="eval"``) or the training rows before it, capped by ``max_rows``.
    Rows keep their original ``file:line``, so errors still name the user's file."""
    held = data_cfg.heldout_rows if data_cfg.eval is None else 0
    if held and held >= len(rows):
        raise DataError(f"{name}: data.heldout_rows={held} leaves no training rows ({len(rows)} total)")
    if split == "eval":                      # a separate data.eval file is read whole
        return rows[len(rows) - held:] if held else rows
    rows = rows[:len(rows) - held]
    return rows if data_cfg.max_rows is None else rows[:data_cfg.max_rows]


def _valid(row: Row, renderer: Renderer, on_error: str, skips: SkipLog) -> bool:
    """Field checks before training starts (templates themselves are rendered later, lazily)."""
    try:
        renderer.check(row.record)
        return True
    except FieldError as e:
        if on_error != "skip":
            raise DataError(f"{row.where}: {e}") from None
        skips.add(f"{row.where}: {e}")
        return False


class _Encode:
    """(source index, row) items → length-fitted examples (none for a skipped or dropped row).

    ``group`` encodes a list of items with one batched tokenizer call; calling the object encodes a
    single item, one tokenizer call per text (the straightforward path the batched one must equal)."""

    def __init__(self, sources, tokenizer, seq_len, long_examples, on_error, skips):
        self.sources, self.tokenizer, self.seq_len = sources, tokenizer, seq_len
        self.long_examples, self.on_error, self.skips = long_examples, on_error, skips

    def __call__(self, item) -> list[dict]:
        rendered = self._render(item)
        if rendered is None:
            return []
        example = {}
        for prefix, text in rendered.items():
            example.update({prefix + k: v for k, v in encode_rendered(text, self.tokenizer).items()})
        return fit_length(example, self.seq_len, self.long_examples, tuple(rendered))

    def group(self, items) -> list[dict]:
        rendered = [r for r in map(self._render, items) if r is not None]
        texts = [text for r in rendered for text in r.values()]
        arrays = iter(encode_rendered_batch(texts, self.tokenizer))
        examples = []
        for r in rendered:
            example = {}
            for prefix in r:
                example.update({prefix + k: v for k, v in next(arrays).items()})
            examples += fit_length(example, self.seq_len, self.long_examples, tuple(r))
        return examples

    def _render(self, item):
        index, row = item
        try:
            return self.sources[index].renderer.render(row.record)
        except Exception as e:  # FieldError or a template's raise_exception
            if self.on_error != "skip":
                raise DataError(f"{row.where}: {e}") from None
            self.skips.add(f"{row.where}: {e}")
            return None


class _Flatten(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 20

    def flat_map(self, element):
        return element


class _HostRows:
    """Rows ``index·rows .. index·rows + rows - 1`` of a global batch (this process's block)."""

    def __init__(self, rows: int, index: int):
        self.rows, self.index = rows, index

    def __call__(self, batch):
        block = slice(self.index * self.rows, (self.index + 1) * self.rows)
        return {k: v[block] for k, v in batch.items()}


class _Tag:
    def __init__(self, index):
        self.index = index

    def __call__(self, row):
        return self.index, row


def _rename_packed(row: dict, prefixes) -> dict:
    """Grain's packed output of separately packed ``KEYS`` → the batch contract (reference path)."""
    out = {}
    for p in prefixes:
        for key in KEYS:
            out[p + key] = row[p + key]
        out[p + "positions"] = row[p + "input_ids_positions"].astype(np.int32)
        out[p + "segment_ids"] = row[p + "input_ids_segment_ids"].astype(np.int32)
    return out


class _PadBatch:
    """Pad a short final batch with all-padding rows so every batch is ``[B, T]``."""

    def __init__(self, batch_size):
        self.batch_size = batch_size

    def __call__(self, batch):
        missing = self.batch_size - next(iter(batch.values())).shape[0]
        if missing <= 0:
            return batch
        return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def build_dataset(data_cfg, tokenizer, *, batch_size: int, seq_len: int | None = None, seed: int | None = None,
                  num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                  split: str = "train", skips: SkipLog | None = None,
                  read_options: grain.ReadOptions | None = None, fast_path: bool = True,
                  benchmarks_dir=None) -> grain.IterDataset:
    """The grain pipeline behind ``make_dataset`` (``batch_size`` is global; each process gets its
    ``batch_size // process_count`` rows of every global batch). ``read_options``
    replaces the default one-thread prefetch (``ReadOptions(num_threads=0)``: all work in the caller).
    ``fast_path=False`` is the straightforward reference the fast path must equal batch for batch: one
    tokenizer call per text, and the packer placing ids, targets and loss mask as three arrays."""
    if batch_size % process_count:
        raise DataError(f"global batch size {batch_size} is not divisible by {process_count} hosts")
    seq_len = seq_len or data_cfg.seq_len
    seed = data_cfg.seed if seed is None else seed
    skips = skips if skips is not None else SkipLog()
    sources = resolve_sources(data_cfg, tokenizer, split=split, skips=skips, benchmarks_dir=benchmarks_dir)
    shuffle = data_cfg.shuffle and split == "train"
    parts = []
    for i, source in enumerate(sources):
        ds = grain.MapDataset.source(source.rows).map(_Tag(i))
        parts.append(ds.shuffle(seed=(seed * 1000003 + i) % 2**32) if shuffle else ds)
    if len(parts) == 1:
        ds = parts[0].repeat(num_epochs) if num_epochs != 1 else parts[0]
    else:  # an "epoch" of a mixture = as many examples as all sources hold together
        ds = grain.MapDataset.mix([p.repeat() for p in parts], [s.weight for s in sources])
        if num_epochs is not None:
            ds = ds[: num_epochs * sum(len(s.rows) for s in sources)]
    encode = _Encode(sources, tokenizer, seq_len, data_cfg.long_examples, data_cfg.on_error, skips)
    _probe(ds, _Encode(sources, tokenizer, seq_len, data_cfg.long_examples, data_cfg.on_error, SkipLog()), seq_len,
           limit=min(64, sum(len(s.rows) for s in sources)))
    prefixes = ("chosen_", "rejected_") if any(s.renderer.format == "preference" for s in sources) else ("",)
    if len({s.renderer.format == "preference" for s in sources}) > 1:
        raise DataError("data.sources: preference data cannot be mixed with single-sequence formats")
    columns = fast_path and data_cfg.pack
    if fast_path:  # ENCODE_GROUP rows per batched tokenizer call (and per prefetch element), order kept
        groups = ds.batch(ENCODE_GROUP, batch_fn=list).map(encode.group)
        if columns:
            groups = groups.map(functools.partial(stack_columns, prefixes=prefixes))
    else:
        groups = ds.map(encode)
    it = grain.experimental.FlatMapIterDataset(groups.to_iter_dataset(read_options or PREFETCH), _Flatten())
    if data_cfg.pack:
        bins = data_cfg.pack_bins or max(2 * batch_size, 16)
        keys = prefixes if columns else [p + k for p in prefixes for k in KEYS]
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={k: seq_len for k in keys}, num_packing_bins=bins, shuffle_bins=False)
        it = it.map(functools.partial(unstack_columns if columns else _rename_packed, prefixes=prefixes))
    else:
        it = it.map(lambda example: pad_row(example, seq_len, prefixes))
    it = it.batch(batch_size, drop_remainder=False).map(_PadBatch(batch_size))
    return it.map(_HostRows(batch_size // process_count, process_index)) if process_count > 1 else it


def _probe(ds, encode: _Encode, seq_len: int, limit: int = 64) -> None:
    """Fail before training when no example survives tokenizing and the length policy."""
    n = min(len(ds), limit)
    if n and not any(encode(ds[i]) for i in range(n)):
        raise DataError(f"none of the first {n} examples is usable at seq_len={seq_len} with "
                        f"long_examples={encode.long_examples!r} ({encode.skips.summary()})")


class DataIterator:
    """Batches as dicts of numpy ``[B, T]`` arrays; ``get_state``/``set_state`` checkpoint the position."""

    def __init__(self, dataset: grain.IterDataset, skips: SkipLog, batch_size: int, seq_len: int):
        self.dataset, self.skips = dataset, skips
        self.batch_size, self.seq_len = batch_size, seq_len
        self._iterator = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)

    @property
    def skipped(self) -> int:
        return self.skips.count


def make_dataset(data_cfg, tokenizer, *, batch_size: int, seq_len: int | None = None, seed: int | None = None,
                 num_epochs: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, split: str = "train", benchmarks_dir=None) -> DataIterator:
    """Iterator of host-local batches (``batch_size // process_count`` rows) following the batch
    contract in docs/DATA.md. ``num_epochs=None`` repeats forever; ``split="eval"`` reads
    ``data.eval`` once, unshuffled. ``benchmarks_dir``: the test files ``data.decontaminate`` reads."""
    if process_index is None or process_count is None:
        import jax  # lazy: the data pipeline itself needs no accelerator runtime
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if split == "eval":
        num_epochs = 1
    skips = SkipLog()
    dataset = build_dataset(data_cfg, tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed,
                            num_epochs=num_epochs, process_index=process_index,
                            process_count=process_count, split=split, skips=skips,
                            benchmarks_dir=benchmarks_dir)
    return DataIterator(dataset, skips, batch_size // process_count, seq_len or data_cfg.seq_len)


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Fraction of positions that hold a real token (segment id > 0)."""
    segments = batch.get("segment_ids", batch.get("chosen_segment_ids"))
    return float((segments > 0).mean()) if segments is not None else math.nan
