"""Benchmark decontamination: which training rows share an n-gram with a test item.

Text is normalised the usual way (GPT-3, PaLM): lowercased, punctuation replaced by spaces,
split on whitespace. A test item's n-grams come from its question, and from its question
followed by its options (bare, and lettered "A. .. B. .." as prompts print them; for PubMedQA:
the question and each context), so questions shorter than ``n`` tokens are still covered when a
row holds them with their options. An item with fewer than ``n`` tokens in all is counted as not
checkable.

The index (``BenchmarkIndex``) is built once: the test tokens (64-bit hashes of their bytes)
form a sorted vocabulary whose positions are token ids (a training token outside it can start no
match), every n-gram of ids gets a 64-bit polynomial hash, kept sorted with the items that own it.
N-grams that ``COMMON_ITEMS`` or more items of one task share are boilerplate of the benchmark
("which of the following is the most likely cause of this patient's symptoms"), not of one item,
and are left out. Training rows are scanned in blocks: the strings of a row (any field, chat turns
included) are lowercased and split into tokens on bytes with numpy (``token_hashes``; equal to
``normalize``), the block's n-gram hashes are looked up at once (a bitmap, then a binary search),
and only rows with a hit are checked token by token (which also rules out hash collisions) for
the longest shared span. ``decontaminate_scan.scan_sources`` splits JSON-lines files into byte
ranges and runs them on a process pool, so the data is streamed, never held.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np

from medjax.errors import ConfigError

from medjax.data.sources import Row

MIN_N = 5
COMMON_ITEMS = 3
DEFAULT_TASKS = ("medqa_4options", "medmcqa", "pubmedqa", "mmlu_medical")
_PUNCT = re.compile(r"[^\w\s]+")
_SEPARATOR = " zq0sep0qz "           # a token no test item has (dropped from the vocabulary)
_MULT = np.uint64(0x9E3779B97F4A7C15)
_BLOCK_ROWS = 2048
_FILTER_BITS = 24
_TOKEN_P = 0x100000001B3                     # odd: invertible modulo 2**64
_TOKEN_Q = pow(_TOKEN_P, -1, 1 << 64)
_WORD_BYTE = np.zeros(256, bool)            # bytes of normalised text that belong to a token
_WORD_BYTE[[ord(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789_"]] = True
_WORD_BYTE[128:] = True
_POWERS: list = []


def normalize(text: str) -> list[str]:
    """Lowercase, punctuation → space, whitespace tokens (the definition; ``token_hashes`` is
    the same split done on bytes with numpy)."""
    return _PUNCT.sub(" ", text.lower()).split()


def normalized_bytes(text: str) -> bytes:
    """``text`` lowercased, as UTF-8, such that its tokens are the runs of word bytes: ASCII text
    as it is (punctuation and whitespace are not word bytes), other text through ``normalize``."""
    text = text.lower()
    if not text.isascii():
        text = " ".join(_PUNCT.sub(" ", text).split())
    return text.encode("utf-8")


def _powers(length: int) -> tuple[np.ndarray, np.ndarray]:
    """Q**i and P**i modulo 2**64 for i < length (grown and kept)."""
    if not _POWERS or len(_POWERS[0]) < length:
        size = max(length, 2 * len(_POWERS[0]) if _POWERS else 0, 1 << 22)
        one = np.ones(1, np.uint64)
        with np.errstate(over="ignore"):
            q = np.cumprod(np.concatenate([one, np.full(size - 1, _TOKEN_Q, np.uint64)]), dtype=np.uint64)
            p = np.cumprod(np.concatenate([one, np.full(size - 1, _TOKEN_P, np.uint64)]), dtype=np.uint64)
        _POWERS[:] = [q, p]
    return _POWERS[0], _POWERS[1]


def token_hashes(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(64-bit hash, start, end) of every token of ``normalized_bytes`` output, all in numpy: the
    hash of bytes [s, e) is sum b[j] Q**j over the span (a prefix sum) times P**s = sum b[j] Q**(j-s)."""
    b = np.frombuffer(data, np.uint8)
    word = np.concatenate([[False], _WORD_BYTE[b], [False]])
    edges = np.diff(word.astype(np.int8))
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    q, p = _powers(len(b) + 1)
    with np.errstate(over="ignore"):
        prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(b.astype(np.uint64) * q[:len(b)], dtype=np.uint64)])
        return (prefix[ends] - prefix[starts]) * p[starts], starts, ends


def ngram_hashes(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, start positions) of the n-grams of ``ids`` that contain no 0 (unknown/separator)."""
    m = len(ids) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    ids = ids.astype(np.uint64)
    h = np.zeros(m, np.uint64)
    for j in range(n):
        h = h * _MULT + ids[j:j + m]
    bad = np.concatenate([[0], np.cumsum(ids == 0)])
    ok = (bad[n:n + m] - bad[:m]) == 0
    return h[ok], np.nonzero(ok)[0]


class TestItem(NamedTuple):
    task: str
    id: str
    where: str
    pieces: tuple[str, ...]        # normalised token streams, each joined by single spaces


def _ids(vocab: np.ndarray, token_h: np.ndarray) -> np.ndarray:
    """Token ids: position in the test vocabulary + 1, or 0 for a token no test item has."""
    if not len(vocab):
        return np.zeros(len(token_h), np.int64)
    k = np.minimum(np.searchsorted(vocab, token_h), len(vocab) - 1)
    return np.where(vocab[k] == token_h, k + 1, 0)


def _tokens(text: str) -> tuple[list[str], np.ndarray]:
    """(token strings, token hashes) of one text."""
    data = normalized_bytes(text)
    h, starts, ends = token_hashes(data)
    return [data[a:b].decode("utf-8") for a, b in zip(starts, ends)], h


def _common(pairs: np.ndarray, tasks: list[str]) -> np.ndarray:
    """Hashes that COMMON_ITEMS or more items of one task share (question stems such as "which of
    the following is the most likely cause of this patient's symptoms")."""
    task_ids = {t: i for i, t in enumerate(dict.fromkeys(tasks))}
    owner_task = np.array([task_ids[t] for t in tasks], np.uint64)[pairs[1].astype(np.int64)]
    per_task, counts = np.unique(np.stack([pairs[0], owner_task]), axis=1, return_counts=True)
    return np.unique(per_task[0][counts >= COMMON_ITEMS])


def item_pieces(doc: dict) -> list[str]:
    """The texts whose n-grams stand for one test item."""
    if doc.get("contexts"):
        return [doc["question"], *doc["contexts"]]
    lettered = (f"{letter} {option}" for letter, option in zip("abcdefghij", doc["options"]))
    return [doc["question"], " ".join([doc["question"], *doc["options"]]), " ".join([doc["question"], *lettered])]


@dataclass
class BenchmarkIndex:
    n: int
    vocab: np.ndarray           # sorted token hashes of the test items; token id = position + 1
    items: list[TestItem]
    hashes: np.ndarray          # sorted unique n-gram hashes [H]
    owner_ptr: np.ndarray       # CSR: items of hash k = owner_items[owner_ptr[k]:owner_ptr[k + 1]]
    owner_items: np.ndarray
    checkable: np.ndarray       # [items] bool: the item has at least one n-gram
    common: int = 0             # n-grams left out: boilerplate of COMMON_ITEMS or more items of one task
    filter: np.ndarray | None = None

    @classmethod
    def build(cls, items: Iterable[tuple[str, str, str, list[str]]], n: int) -> "BenchmarkIndex":
        """``items``: (task, id, where, texts)."""
        all_items, piece_tokens = [], []
        for task, id_, where, texts in items:
            tokens = [_tokens(t) for t in texts]
            all_items.append(TestItem(task, id_, where, tuple(" ".join(t) for t, _ in tokens)))
            piece_tokens.append([h for _, h in tokens])
        every = [h for pieces in piece_tokens for h in pieces]
        vocab = np.unique(np.concatenate(every)) if every else np.zeros(0, np.uint64)
        vocab = vocab[vocab != token_hashes(_SEPARATOR.strip().encode())[0][0]]
        hashes, owners = [], []
        for index, pieces in enumerate(piece_tokens):
            for token_h in pieces:
                h, _ = ngram_hashes(_ids(vocab, token_h), n)
                hashes.append(h)
                owners.append(np.full(len(h), index, np.int64))
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        o = np.concatenate(owners) if owners else np.zeros(0, np.int64)
        pairs = np.unique(np.stack([h, o.astype(np.uint64)]), axis=1) if len(h) else np.zeros((2, 0), np.uint64)
        common = _common(pairs, [item.task for item in all_items])
        pairs = pairs[:, ~np.isin(pairs[0], common)]
        unique, starts = np.unique(pairs[0], return_index=True)
        checkable = np.zeros(len(all_items), bool)
        checkable[pairs[1].astype(np.int64)] = True
        return cls(n, vocab, all_items, unique, np.append(starts, pairs.shape[1]), pairs[1].astype(np.int64),
                   checkable, len(common))

    def contains(self, h: np.ndarray) -> np.ndarray:
        """[len(h)] bool: which hashes are test n-grams (a bitmap on the top bits, then a binary
        search in the sorted table for the few that pass)."""
        if self.filter is None:
            self.filter = np.zeros(1 << _FILTER_BITS, bool)
            self.filter[self.hashes >> np.uint64(64 - _FILTER_BITS)] = True
        out = self.filter[h >> np.uint64(64 - _FILTER_BITS)]
        candidates = np.nonzero(out)[0]
        k = np.minimum(np.searchsorted(self.hashes, h[candidates]), len(self.hashes) - 1)
        out[candidates] = self.hashes[k] == h[candidates]
        return out

    def __getstate__(self):
        return {**self.__dict__, "filter": None}     # rebuilt in each worker, not pickled

    def owners(self, h) -> np.ndarray:
        k = np.searchsorted(self.hashes, h)
        return self.owner_items[self.owner_ptr[k]:self.owner_ptr[k + 1]]


class Match(NamedTuple):
    row: str            # training row, file:line
    item: int           # index into BenchmarkIndex.items
    span_tokens: int    # longest shared span, in normalised tokens
    span: str


def record_texts(record: Any) -> Iterator[str]:
    """Every string value of a record (nested dicts/lists: chat turns, options...)."""
    if isinstance(record, str):
        yield record
    elif isinstance(record, dict):
        for value in record.values():
            yield from record_texts(value)
    elif isinstance(record, (list, tuple)):
        for value in record:
            yield from record_texts(value)


def scan_rows(index: BenchmarkIndex, rows: Iterable[Row]) -> tuple[list[Match], int, int]:
    """(matches, rows, characters of text) of ``rows`` against ``index``, in blocks of rows."""
    matches, n_rows, n_chars, block = [], 0, 0, []
    for row in rows:
        block.append(row)
        if len(block) == _BLOCK_ROWS:
            found, chars = _scan_block(index, block)
            matches.extend(found)
            n_rows, n_chars, block = n_rows + len(block), n_chars + chars, []
    if block:
        found, chars = _scan_block(index, block)
        matches.extend(found)
        n_rows, n_chars = n_rows + len(block), n_chars + chars
    return matches, n_rows, n_chars


def _scan_block(index: BenchmarkIndex, block: list[Row]) -> tuple[list[Match], int]:
    """(matches, characters of text) of one block of rows."""
    texts, chars = [], 0
    for row in block:
        strings = list(record_texts(row.record))
        chars += sum(map(len, strings))
        texts.append(normalized_bytes(_SEPARATOR.join(strings)))   # no n-gram spans two strings
    data = _SEPARATOR.encode().join(texts)                          # ... or two rows
    token_h, starts, _ = token_hashes(data)
    h, first = ngram_hashes(_ids(index.vocab, token_h), index.n)
    hit = index.contains(h)
    if not hit.any():
        return [], chars
    row_starts = np.cumsum([0] + [len(t) + len(_SEPARATOR) for t in texts[:-1]])
    rows = np.searchsorted(row_starts, starts[first[hit]], side="right") - 1
    matches = []
    for r in np.unique(rows):
        matches += _verify(index, block[r])
    return matches, chars


def _verify(index: BenchmarkIndex, row: Row) -> list[Match]:
    """Per test item sharing an n-gram with ``row``: the longest shared span, checked on tokens."""
    n, best = index.n, {}
    for text in record_texts(row.record):
        tokens, token_h = _tokens(text)
        h, starts = ngram_hashes(_ids(index.vocab, token_h), n)
        for k in np.nonzero(index.contains(h))[0]:
            for item in index.owners(h[k]):
                span = _longest_from(tokens, int(starts[k]), n, index.items[item].pieces)
                if span and len(span) > len(best.get(item, ())):
                    best[item] = span
    return [Match(row.where, int(item), len(span), " ".join(span)) for item, span in best.items()]


def _longest_from(tokens: list[str], start: int, n: int, pieces: tuple[str, ...]) -> list[str]:
    """The longest run of ``tokens`` from ``start`` found in a piece (at least n tokens, else [])."""
    padded = [f" {p} " for p in pieces]
    end = start + n
    if not any(f" {' '.join(tokens[start:end])} " in p for p in padded):
        return []                           # a hash collision, not a shared n-gram
    while end < len(tokens) and any(f" {' '.join(tokens[start:end + 1])} " in p for p in padded):
        end += 1
    return tokens[start:end]


def check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < MIN_N:
        raise ConfigError(f"--n {n!r}: n-grams shorter than {MIN_N} tokens match common phrases; use n >= {MIN_N}")
    return n
