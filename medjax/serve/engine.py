"""Continuous batching over the paged KV cache.

One engine thread loops: drop cancelled sequences, admit waiting requests (a slot and all the
pages the request can ever need, so a running sequence never waits for memory), prefill a group
of them, then run ONE decode step for every running sequence. Requests therefore join and leave
the decode batch at every step, and prefill is interleaved with decode.

Shapes are bucketed so nothing recompiles after warm-up: the decode batch is padded to a power of
two (up to ``max_slots``), a prefill group to (power-of-two rows, power-of-two length). The page
table width is fixed (``max_context / page_size``) and decode attention loops only over the
pages in use (``ops.paged_attention``). The model code is ``Decoder.forward``, the same as
``medjax.eval.generate``; greedy rows are argmax, sampled rows use ``sample_rows`` with one PRNG
stream per (seed, choice), so a request's tokens do not depend on what else is in the batch.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import jax
import numpy as np
from flax import nnx

from medjax.errors import ConfigError
from medjax.ops.target import compiler_options
from medjax.eval.generate import sample_rows
from medjax.serve.pages import PageAllocator, PagedKVCache, init_pools, pages_in_budget

log = logging.getLogger("medjax.serve")


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests (HTTP 429)."""


class Draining(Exception):
    """The engine is shutting down and takes no new request (HTTP 503)."""


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    max_slots: int = 32              # sequences decoded together (largest decode bucket)
    max_queue: int = 256             # waiting requests beyond which submit raises QueueFull
    max_context: int | None = None   # tokens per sequence; None = the model's
    kv_budget_bytes: float = 1 << 30
    max_prefill_batch: int = 4
    max_prefill_tokens: int = 2048   # rows x bucket length of one prefill call
    min_prefill_bucket: int = 16


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stream: int = 0                  # choice index: n choices of one seed draw differently


@dataclass(eq=False)
class Sequence:
    """One generation. ``emit(token, finish_reason)`` is called from the engine thread for every
    new token (``finish_reason`` set on the last: "stop", "length" or "error")."""
    prompt: list[int]
    max_tokens: int
    emit: Callable[[int | None, str | None], None]
    sampling: Sampling = Sampling()
    stop_ids: frozenset = frozenset()
    pages: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False

    @property
    def position(self) -> int:
        """Position of the last token (the one the next decode step feeds)."""
        return len(self.prompt) + len(self.generated) - 1


def powers_of_two(limit: int, start: int = 1) -> list[int]:
    """``start, 2*start, ...`` up to ``limit``, with ``limit`` itself last."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def _bucket(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


def _row_keys(seeds_B, streams_B, steps_B):
    key = lambda s, c, n: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), c), n)  # noqa: E731
    return jax.vmap(key)(seeds_B, streams_B, steps_B)


def _prefill(graphdef, state, k, v, ids_BT, lengths_B, table_BP, sampling):
    model = nnx.merge(graphdef, state)
    cache = PagedKVCache(k, v, table_BP, lengths_B, prefill=True)
    out = model.forward(ids_BT, cache=cache, logits_at=(lengths_B - 1)[:, None])
    temperature, top_k, top_p, seeds, streams, steps = sampling
    tokens = sample_rows(out.logits[:, 0], _row_keys(seeds, streams, steps), temperature, top_k, top_p)
    return tokens, out.cache.k, out.cache.v


def _decode(graphdef, state, k, v, tokens_B, positions_B, lengths_B, table_BP, sampling):
    model = nnx.merge(graphdef, state)
    cache = PagedKVCache(k, v, table_BP, lengths_B)
    out = model.forward(tokens_B[:, None], positions=positions_B[:, None], cache=cache)
    temperature, top_k, top_p, seeds, streams, steps = sampling
    tokens = sample_rows(out.logits[:, 0], _row_keys(seeds, streams, steps), temperature, top_k, top_p)
    return tokens, out.cache.k, out.cache.v


class Engine:
    """Continuous-batching generation for one model; ``start()`` runs it in a thread."""

    def __init__(self, model, config: EngineConfig = EngineConfig()):
        if getattr(model, "scan_layers", False):
            raise ConfigError("medjax.serve needs the per-layer model layout (load with "
                              "scan_layers=False)")
        self.model, self.config = model, config
        cfg = model.config
        self.max_context = min(config.max_context or cfg.max_position_embeddings,
                               cfg.max_position_embeddings)
        self.table_width = math.ceil(self.max_context / config.page_size)
        num_pages = pages_in_budget(cfg, config.page_size, model.dtype, config.kv_budget_bytes)
        self.allocator = PageAllocator(num_pages, config.page_size)
        self.k, self.v = init_pools(cfg, num_pages, config.page_size, model.dtype)
        self.decode_buckets = powers_of_two(config.max_slots)
        self.prefill_rows = powers_of_two(min(config.max_prefill_batch, config.max_slots))
        self.prefill_lengths = powers_of_two(self.max_context, config.min_prefill_bucket)
        graphdef, self.state = nnx.split(model)
        options = compiler_options(self.state)
        self._prefill = jax.jit(partial(_prefill, graphdef), donate_argnums=(1, 2),
                                compiler_options=options)
        self._decode = jax.jit(partial(_decode, graphdef), donate_argnums=(1, 2),
                               compiler_options=options)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining = False
        self.steps = 0

    # ------------------------------------------------------------------ requests
    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise ``ConfigError`` for a request that can never run (prompt beyond the context, or more
        pages than the pool)."""
        if prompt_len < 1:
            raise ConfigError("the prompt is empty")
        if prompt_len + max_tokens > self.max_context:
            raise ConfigError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"context of {self.max_context} tokens")
        pages = self.allocator.pages_for(prompt_len + max_tokens)
        if pages > self.allocator.num_pages:
            raise ConfigError(f"the request needs {pages} KV pages; the pool holds "
                                  f"{self.allocator.num_pages}")

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); ``QueueFull`` / ``Draining`` / ``ConfigError``."""
        for s in seqs:
            self.check(len(s.prompt), s.max_tokens)
        with self._cv:
            if self.draining:
                raise Draining("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting); "
                                "retry later")
            self.waiting.extend(seqs)
            self._cv.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` (client gone, stop string hit); its pages are freed at the next step."""
        seq.cancelled = True
        with self._cv:
            self._cv.notify()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling
    def step(self) -> bool:
        """One iteration: admit + prefill one group, then one decode step. False if idle."""
        self._drop_cancelled()
        group = self._admit()
        if group:
            self._run_guarded(group, self._prefill_group)
        if self.running:
            self._run_guarded(list(self.running), self._decode_step)
        self.steps += 1
        return bool(group or self.running)

    def _drop_cancelled(self) -> None:
        with self._cv:
            for s in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(s)
        for s in [s for s in self.running if s.cancelled]:
            self._retire(s)

    def _admit(self) -> list[Sequence]:
        """The next prefill group (FIFO): pages reserved for its whole generation."""
        cfg = self.config
        group: list[Sequence] = []
        with self._cv:
            while (self.waiting and len(group) < self.prefill_rows[-1]
                   and len(self.running) + len(group) < cfg.max_slots):
                s = self.waiting[0]
                longest = max([len(s.prompt)] + [len(g.prompt) for g in group])
                rows = _bucket(len(group) + 1, self.prefill_rows)
                if group and rows * _bucket(longest, self.prefill_lengths) > cfg.max_prefill_tokens:
                    break
                pages = self.allocator.allocate(self.allocator.pages_for(len(s.prompt) + s.max_tokens))
                if pages is None:
                    break
                s.pages = pages
                group.append(self.waiting.popleft())
        return group

    def _run_guarded(self, seqs, fn) -> None:
        try:
            fn(seqs)
        except Exception:          # a failed step fails its sequences, the engine keeps serving
            log.exception("engine step failed")
            for s in seqs:
                if not s.finished:
                    self._finish(s, None, "error")

    def _table(self, seqs, rows: int) -> np.ndarray:
        table = np.full((rows, self.table_width), self.allocator.num_pages, np.int32)
        for i, s in enumerate(seqs):
            table[i, :len(s.pages)] = s.pages
        return table

    def _sampling(self, seqs, rows: int):
        pad = rows - len(seqs)
        col = lambda f, dt: np.array([f(s) for s in seqs] + [0] * pad, dt)  # noqa: E731
        return (col(lambda s: s.sampling.temperature, np.float32),
                col(lambda s: s.sampling.top_k, np.int32),
                np.array([s.sampling.top_p for s in seqs] + [1.0] * pad, np.float32),
                col(lambda s: s.sampling.seed & 0xFFFFFFFF, np.uint32),
                col(lambda s: s.sampling.stream, np.int32),
                col(lambda s: len(s.generated), np.int32))

    def _prefill_group(self, group: list[Sequence]) -> None:
        rows = _bucket(len(group), self.prefill_rows)
        T = _bucket(max(len(s.prompt) for s in group), self.prefill_lengths)
        ids = np.zeros((rows, T), np.int32)
        lengths = np.zeros((rows,), np.int32)
        for i, s in enumerate(group):
            ids[i, :len(s.prompt)] = s.prompt
            lengths[i] = len(s.prompt)
        tokens, self.k, self.v = self._prefill(self.state, self.k, self.v, ids, lengths,
                                               self._table(group, rows), self._sampling(group, rows))
        tokens = np.asarray(tokens)
        for i, s in enumerate(group):
            self.running.append(s)
            self._accept(s, int(tokens[i]))

    def _decode_step(self, seqs: list[Sequence]) -> None:
        rows = _bucket(len(seqs), self.decode_buckets)
        tokens = np.zeros((rows,), np.int32)
        positions = np.zeros((rows,), np.int32)
        lengths = np.zeros((rows,), np.int32)
        for i, s in enumerate(seqs):
            tokens[i], positions[i] = s.generated[-1], s.position
            lengths[i] = s.position + 1
        new, self.k, self.v = self._decode(self.state, self.k, self.v, tokens, positions, lengths,
                                           self._table(seqs, rows), self._sampling(seqs, rows))
        new = np.asarray(new)
        for i, s in enumerate(seqs):
            self._accept(s, int(new[i]))

    def _accept(self, s: Sequence, token: int) -> None:
        if s.cancelled:
            return
        s.generated.append(token)
        if token in s.stop_ids:
            self._finish(s, token, "stop")
        elif len(s.generated) >= s.max_tokens:
            self._finish(s, token, "length")
        else:
            s.emit(token, None)

    def _finish(self, s: Sequence, token, reason: str) -> None:
        s.finished = True
        self._retire(s)
        s.emit(token, reason)

    def _retire(self, s: Sequence) -> None:
        if s in self.running:
            self.running.remove(s)
        if s.pages:
            self.allocator.release(s.pages)
            s.pages = []

    # ------------------------------------------------------------------ warm-up, thread
    def warmup(self) -> int:
        """Compile every bucket (dummy rows whose writes are dropped); returns the programs."""
        def sampling(rows):
            z = np.zeros((rows,), np.int32)
            return (np.zeros((rows,), np.float32), z, np.ones((rows,), np.float32),
                    z.astype(np.uint32), z, z)
        for rows in self.prefill_rows:
            for T in self.prefill_lengths:
                if rows > 1 and rows * T > self.config.max_prefill_tokens:
                    continue
                _, self.k, self.v = self._prefill(
                    self.state, self.k, self.v, np.zeros((rows, T), np.int32),
                    np.zeros((rows,), np.int32), self._table([], rows), sampling(rows))
        for rows in self.decode_buckets:
            z = np.zeros((rows,), np.int32)
            _, self.k, self.v = self._decode(self.state, self.k, self.v, z, z, z,
                                             self._table([], rows), sampling(rows))
        jax.block_until_ready(self.k)
        return self.compiled_programs()

    def compiled_programs(self) -> int:
        """Programs compiled so far (prefill + decode); constant after ``warmup``."""
        return self._prefill._cache_size() + self._decode._cache_size()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="medjax-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.busy:
                    self._cv.wait()
                if self._stop and not self.busy:
                    return
            self.step()

    def drain(self) -> None:
        """Refuse new requests (``Draining``); those queued or running still finish."""
        with self._cv:
            self.draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued and running sequence, then end the thread."""
        with self._cv:
            self.draining = self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
