"""Batched log-likelihood scoring of (context, continuation) token requests.

Requests are grouped by their context tokens, so a context shared by all choices of a
question is run through the model ONCE:

* every continuation one token long (letter answers: " A"): the choices' log-probs are read
  from the logits at the context's last position — one forward per question;
* longer continuations (``--score full_answer``): the context fills a KV cache once, then
  each choice's tokens are run on top of that cache (slot == position, so every choice
  overwrites the same slots and attends only to the context and itself).

Groups are sorted by length and batched in fixed (batch, length) buckets — a handful of
compiled shapes — with right padding; batches are split over the devices when there are
several (plain data parallelism).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from medjax.eval.requests import Item, Request

LENGTH_BUCKETS = (32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1280,
                  1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192, 12288, 16384, 32768, 65536, 131072)


def bucket(n: int, buckets: Iterable[int] = LENGTH_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return int(2 ** math.ceil(math.log2(n)))


@dataclass
class _Group:
    """One distinct context and its distinct continuations (each may serve several requests)."""
    context: tuple[int, ...]
    continuations: dict[tuple[int, ...], list[Request]]


def score_batch(graphdef, state, ids_BT, ctx_len_B, cont_BKM, cont_len_BK):
    """Summed log-prob and all-greedy flag of each continuation ``[B, K]``.

    ``ids_BT``: contexts, right-padded; ``cont_BKM``: K continuations per context, right-padded
    to M tokens (``cont_len_BK`` real tokens; 0 for an absent choice).
    """
    model = nnx.merge(graphdef, state)
    B, T = ids_BT.shape
    K, M = cont_BKM.shape[1:]
    rows_B = jnp.arange(B)
    if M == 1:
        last_logits_BV = model.forward(ids_BT, logits_at=(ctx_len_B - 1)[:, None]).logits[:, 0]
    else:
        out = model.forward(ids_BT, cache=None if M == 1 else model.init_cache(B, T + M - 1))
        last_logits_BV = out.logits[rows_B, ctx_len_B - 1]
    last_lp_BV = jax.nn.log_softmax(last_logits_BV, axis=-1)
    first_lp_BK = jnp.take_along_axis(last_lp_BV, cont_BKM[:, :, 0], axis=1)
    first_greedy_BK = jnp.argmax(last_lp_BV, axis=-1)[:, None] == cont_BKM[:, :, 0]
    if M == 1:
        return first_lp_BK, first_greedy_BK

    positions_BN = ctx_len_B[:, None] + jnp.arange(M - 1, dtype=ctx_len_B.dtype)[None]

    def one_choice(cont_BM):
        logits_BNV = model.forward(cont_BM[:, :-1], positions=positions_BN, cache=out.cache).logits
        lp_BNV = jax.nn.log_softmax(logits_BNV, axis=-1)
        tok_lp_BN = jnp.take_along_axis(lp_BNV, cont_BM[:, 1:, None], axis=-1)[..., 0]
        return tok_lp_BN, jnp.argmax(lp_BNV, axis=-1) == cont_BM[:, 1:]

    rest_lp_KBN, rest_greedy_KBN = jax.lax.map(one_choice, jnp.swapaxes(cont_BKM, 0, 1))
    mask_BKN = jnp.arange(M - 1)[None, None] < (cont_len_BK - 1)[..., None]
    rest_lp_BKN = jnp.swapaxes(rest_lp_KBN, 0, 1)
    rest_greedy_BKN = jnp.swapaxes(rest_greedy_KBN, 0, 1)
    total_BK = first_lp_BK + jnp.sum(jnp.where(mask_BKN, rest_lp_BKN, 0.0), axis=-1)
    greedy_BK = first_greedy_BK & jnp.all(jnp.where(mask_BKN, rest_greedy_BKN, True), axis=-1)
    return total_BK, greedy_BK


class Scorer:
    """Fills ``Request.loglikelihood`` / ``is_greedy`` for every request of a list of items."""

    def __init__(self, model, *, tokens_per_batch: int = 4096, pad_id: int = 0,
                 buckets: Iterable[int] = LENGTH_BUCKETS, max_batch: int = 64):
        graphdef, self.state = nnx.split(model)
        # The graphdef is static; it is bound here (not hashed) because model configs hold dicts.
        self._score_fn = jax.jit(partial(score_batch, graphdef))
        self.tokens_per_batch = tokens_per_batch
        self.pad_id = pad_id
        self.buckets = tuple(buckets)
        self.max_batch = max_batch
        self.n_devices = jax.device_count()
        self.batch_sharding = None
        if self.n_devices > 1:
            mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
            self.batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            if all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(self.state)):
                self.state = jax.device_put(self.state, replicated)

    def _batch_size(self, length: int, n_left: int) -> int:
        full = max(1, min(self.max_batch, self.tokens_per_batch // length))
        full = 2 ** int(math.log2(full))
        size = min(full, 2 ** math.ceil(math.log2(max(n_left, 1))))  # small tail → small batch
        return int(math.ceil(size / self.n_devices) * self.n_devices)

    def score(self, items: list[Item], desc: str = "scoring") -> None:
        groups: dict[tuple[int, ...], _Group] = {}
        owner: dict[int, int] = {}
        for item_no, item in enumerate(items):
            for req in item.requests:
                group = groups.setdefault(req.context_tokens, _Group(req.context_tokens, {}))
                group.continuations.setdefault(req.continuation_tokens, []).append(req)
                owner[id(req)] = item_no
        remaining = [len(item.requests) for item in items]
        by_shape: dict[tuple[int, int], list[_Group]] = defaultdict(list)
        for g in groups.values():
            cont_len = max(len(c) for c in g.continuations)
            by_shape[(bucket(len(g.context), self.buckets),
                      1 if cont_len == 1 else bucket(cont_len, (4, 8, 16, 32, 64, 128, 256)))].append(g)
        k_max = max((len(g.continuations) for g in groups.values()), default=1)
        bar = tqdm(total=len(items), desc=desc, unit="item", smoothing=0.05)
        for (length, cont_len), shape_groups in sorted(by_shape.items(), reverse=True):
            shape_groups.sort(key=lambda g: -len(g.context))
            start = 0
            while start < len(shape_groups):
                size = self._batch_size(length, len(shape_groups) - start)
                batch = shape_groups[start:start + size]
                start += size
                self._run(batch, size, length, k_max, cont_len)
                done = 0
                for g in batch:
                    for reqs in g.continuations.values():
                        for req in reqs:
                            remaining[owner[id(req)]] -= 1
                            done += remaining[owner[id(req)]] == 0
                bar.update(done)
        bar.close()

    def _run(self, batch: list[_Group], size: int, length: int, k_max: int, cont_len: int) -> None:
        ids_BT = np.full((size, length), self.pad_id, np.int32)
        ctx_len_B = np.ones((size,), np.int32)
        cont_BKM = np.zeros((size, k_max, cont_len), np.int32)
        cont_len_BK = np.zeros((size, k_max), np.int32)
        for b, g in enumerate(batch):
            ids_BT[b, : len(g.context)] = g.context
            ctx_len_B[b] = len(g.context)
            for k, cont in enumerate(g.continuations):
                cont_BKM[b, k, : len(cont)] = cont
                cont_len_BK[b, k] = len(cont)
        arrays = (ids_BT, ctx_len_B, cont_BKM, cont_len_BK)
        if self.batch_sharding is not None:
            arrays = jax.device_put(arrays, self.batch_sharding)
        total_BK, greedy_BK = jax.device_get(self._score_fn(self.state, *arrays))
        for b, g in enumerate(batch):
            for k, reqs in enumerate(g.continuations.values()):
                for req in reqs:
                    req.loglikelihood = float(total_BK[b, k])
                    req.is_greedy = bool(greedy_BK[b, k])
