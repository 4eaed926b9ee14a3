"""Batched log-likelihood scoring of (context, continuation) token requests.

Requests are grouped by their context tokens, so a context shared by all choices of a
question is run through the model ONCE:

* every continuation one token long (letter answers: " A"): the choices' log-probs are read
  from the logits at the context's last position — one forward per question. These contexts
  are PACKED several to a row (first-fit decreasing, ``segment_ids`` keep them apart,
  positions restart at each one), so almost no padding is computed and one compiled shape
  serves them all;
* longer continuations (``--score full_answer``): the context fills a KV cache once, then
  each choice's tokens are run on top of that cache (slot == position, so every choice
  overwrites the same slots and attends only to the context and itself).

Contexts too long to pack, and those with longer continuations, are sorted by length and
cut into (length, batch) buckets by :func:`plan_buckets`, a small dynamic programme that
trades padding against compiled shapes (each new shape costs an XLA compile, about as long
as running one batch); batches are right-padded. Every batch is split over the batch axes of
the model's mesh (the mesh its weights were loaded onto; without one, every device holds the
weights and takes a share of the rows). In several processes each one builds the same batches
(the request list is the same everywhere), feeds its devices' rows, and gets every score back
(replicated outputs), so all processes hold identical results.
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
from medjax.ops.target import compiler_options

LENGTH_BUCKETS = (32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1280,
                  1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192, 12288, 16384, 32768, 65536, 131072)


def bucket(n: int, buckets: Iterable[int] = LENGTH_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return int(2 ** math.ceil(math.log2(n)))


def plan_buckets(lengths, *, tokens_per_batch: int, max_batch: int = 64, multiple_of: int = 1,
                 align: int = 8, compile_cost: int | None = None) -> list[tuple[int, int, list[int]]]:
    """Cut requests into buckets ``[(length, batch_size, indices)]`` at the least total cost.

    A bucket holds requests of consecutive (sorted) lengths, is padded to its longest one
    (rounded up to ``align``) and runs in batches of ``batch_size = tokens_per_batch // length``
    rows (a multiple of ``multiple_of``, the device count); its cost is the padded tokens it
    computes, the partly empty last batch included, plus ``compile_cost`` tokens for its
    compiled shape (default: one batch's worth). Exact dynamic programme over the distinct
    aligned lengths.
    """
    compile_cost = tokens_per_batch if compile_cost is None else compile_cost
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    aligned = [-(-max(lengths[i], 1) // align) * align for i in order]
    ends = [k + 1 for k in range(len(order)) if k + 1 == len(order) or aligned[k + 1] != aligned[k]]

    def rows(length):
        b = max(1, min(max_batch, tokens_per_batch // length))
        return -(-b // multiple_of) * multiple_of

    def cost(start, end):       # requests order[start:end] in one bucket
        length = aligned[end - 1]
        b = rows(length)
        return -(-(end - start) // b) * b * length + compile_cost

    best = {0: (0, None)}       # prefix end -> (cost, previous cut)
    for j in ends:
        best[j] = min((best[i][0] + cost(i, j), i) for i in [0] + ends if i < j and i in best)
    plan, j = [], len(order)
    while j:
        i = best[j][1]
        plan.append((aligned[j - 1], rows(aligned[j - 1]), order[i:j]))
        j = i
    return plan


def pack_rows(lengths, row_length: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` (each ``<= row_length``) grouped into rows."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(row_length)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def score_packed(graphdef, state, ids_BT, positions_BT, segments_BT, last_BP, cont_BPK):
    """Log-prob and greedy flag ``[B, P, K]`` of one-token continuations of packed contexts.

    Row ``b`` holds up to ``P`` contexts; ``last_BP`` indexes each one's last token (padding
    entries point anywhere and are ignored by the caller)."""
    model = nnx.merge(graphdef, state)
    logits_BPV = model.forward(ids_BT, positions=positions_BT, segment_ids=segments_BT,
                               logits_at=last_BP).logits
    lp_BPV = jax.nn.log_softmax(logits_BPV, axis=-1)
    return (jnp.take_along_axis(lp_BPV, cont_BPK, axis=-1),
            jnp.argmax(lp_BPV, axis=-1)[..., None] == cont_BPK)


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
    # The output head runs at each context's last position only, with or without a cache.
    out = model.forward(ids_BT, cache=None if M == 1 else model.init_cache(B, T + M - 1),
                        logits_at=(ctx_len_B - 1)[:, None])
    last_logits_BV = out.logits[:, 0]
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


def mesh_of(state):
    """The mesh the model's weights were placed on (``medjax.sharding`` axes), else a ``dp``
    mesh over every device."""
    from medjax.sharding import MESH_AXES, make_mesh
    for x in jax.tree.leaves(state):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.axis_names == MESH_AXES:
            return sharding.mesh
    from medjax.config import MeshSection
    return make_mesh(MeshSection(preset="dp"))


def traced_for(model, mesh, fn):
    """``fn`` as the model's forward needs it traced: a model whose layers run as a pipeline
    (``pipeline_stages > 1``: a run trained with ``mesh.stage``, or ``medjax.eval ...
    mesh.stage=S``) is traced with ``mesh`` as the context mesh and its sharding rules
    (``train.step.on_mesh``), so each stage runs the layers it holds (models/pipeline.py);
    other models as they are."""
    if getattr(model, "pipeline_stages", 1) <= 1:
        return fn
    from medjax.train.step import on_mesh
    return on_mesh(mesh, fn)


def _on(mesh, x) -> bool:
    sharding = getattr(x, "sharding", None)
    return isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh


def _k_max(groups: list[_Group]) -> int:
    return max((len(g.continuations) for g in groups), default=1)


class Scorer:
    """Fills ``Request.loglikelihood`` / ``is_greedy`` for every request of a list of items."""

    def __init__(self, model, *, tokens_per_batch: int = 4096, pad_id: int = 0, max_batch: int = 64,
                 compile_cost: int | None = None, pack_length: int | None = 384):
        from medjax.sharding import batch_sharding, batch_shards, place_array
        graphdef, state = nnx.split(model)
        mesh = mesh_of(state)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # weights not on the mesh (loaded unsharded) are replicated onto it
        self.state = jax.tree.map(lambda x: x if _on(mesh, x) else place_array(x, replicated), state)
        self.batch_sharding = batch_sharding(mesh)
        # The graphdef is static; it is bound here (not hashed) because model configs hold dicts.
        options = compiler_options(mesh)
        self._score_fn = jax.jit(traced_for(model, mesh, partial(score_batch, graphdef)),
                                 out_shardings=replicated, compiler_options=options)
        self._packed_fn = jax.jit(traced_for(model, mesh, partial(score_packed, graphdef)),
                                  out_shardings=replicated, compiler_options=options)
        self.pack_length = pack_length
        self.tokens_per_batch = tokens_per_batch
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.compile_cost = compile_cost
        # batches are a multiple of the batch shards (pipelined: of them x the stages, so that
        # each of the S micro-batches splits over them)
        self.n_devices = batch_shards(mesh) * max(1, getattr(model, "pipeline_stages", 1))

    def _on_mesh(self, *arrays) -> tuple:
        """Host batches (the same on every process) → global arrays split over the batch axes."""
        from medjax.sharding import place_array
        return tuple(place_array(a, self.batch_sharding) for a in arrays)

    def score(self, items: list[Item], desc: str = "scoring") -> None:
        groups: dict[tuple[int, ...], _Group] = {}
        owner: dict[int, int] = {}
        for item_no, item in enumerate(items):
            for req in item.requests:
                group = groups.setdefault(req.context_tokens, _Group(req.context_tokens, {}))
                group.continuations.setdefault(req.continuation_tokens, []).append(req)
                owner[id(req)] = item_no
        remaining = [len(item.requests) for item in items]
        by_cont_len: dict[int, list[_Group]] = defaultdict(list)
        for g in groups.values():
            cont_len = max(len(c) for c in g.continuations)
            by_cont_len[1 if cont_len == 1 else bucket(cont_len, (4, 8, 16, 32, 64, 128, 256))].append(g)
        bar = tqdm(total=len(items), desc=desc, unit="item", smoothing=0.05)

        def finished(batch):
            done = 0
            for g in batch:
                for reqs in g.continuations.values():
                    for req in reqs:
                        remaining[owner[id(req)]] -= 1
                        done += remaining[owner[id(req)]] == 0
            bar.update(done)

        if self.pack_length and by_cont_len.get(1):
            packable = [g for g in by_cont_len[1] if len(g.context) <= self.pack_length]
            by_cont_len[1] = [g for g in by_cont_len[1] if len(g.context) > self.pack_length]
            self._score_packed(packable, _k_max(packable), finished)
        for cont_len, cont_groups in sorted(by_cont_len.items()):
            k_max = _k_max(cont_groups)     # per continuation bucket: 4 MCQA options need not pay for 20
            plan = plan_buckets([len(g.context) for g in cont_groups], tokens_per_batch=self.tokens_per_batch,
                                max_batch=self.max_batch, multiple_of=self.n_devices,
                                compile_cost=self.compile_cost)
            for length, size, indices in sorted(plan, key=lambda p: -p[0]):
                for start in range(0, len(indices), size):
                    batch = [cont_groups[i] for i in indices[start:start + size]]
                    self._run(batch, size, length, k_max, cont_len)
                    finished(batch)
        bar.close()

    def _score_packed(self, groups: list[_Group], k_max: int, finished) -> None:
        if not groups:
            return
        L = self.pack_length
        rows = pack_rows([len(g.context) for g in groups], L)
        size = max(1, min(self.max_batch, self.tokens_per_batch // L))
        size = -(-size // self.n_devices) * self.n_devices
        P = 2 ** math.ceil(math.log2(max(len(r) for r in rows)))   # contexts per row (one shape)
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            ids_BT = np.full((size, L), self.pad_id, np.int32)
            pos_BT = np.zeros((size, L), np.int32)
            seg_BT = np.zeros((size, L), np.int32)
            last_BP = np.zeros((size, P), np.int32)
            cont_BPK = np.zeros((size, P, k_max), np.int32)
            for b, row in enumerate(chunk):
                at = 0
                for p, i in enumerate(row):
                    ctx = groups[i].context
                    ids_BT[b, at:at + len(ctx)] = ctx
                    pos_BT[b, at:at + len(ctx)] = np.arange(len(ctx))
                    seg_BT[b, at:at + len(ctx)] = p + 1
                    at += len(ctx)
                    last_BP[b, p] = at - 1
                    for k, cont in enumerate(groups[i].continuations):
                        cont_BPK[b, p, k] = cont[0]
            arrays = self._on_mesh(ids_BT, pos_BT, seg_BT, last_BP, cont_BPK)
            lp_BPK, greedy_BPK = jax.device_get(self._packed_fn(self.state, *arrays))
            for b, row in enumerate(chunk):
                for p, i in enumerate(row):
                    for k, reqs in enumerate(groups[i].continuations.values()):
                        for req in reqs:
                            req.loglikelihood = float(lp_BPK[b, p, k])
                            req.is_greedy = bool(greedy_BPK[b, p, k])
            finished([groups[i] for row in chunk for i in row])

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
        arrays = self._on_mesh(ids_BT, ctx_len_B, cont_BKM, cont_len_BK)
        total_BK, greedy_BK = jax.device_get(self._score_fn(self.state, *arrays))
        for b, g in enumerate(batch):
            for k, reqs in enumerate(g.continuations.values()):
                for req in reqs:
                    req.loglikelihood = float(total_BK[b, k])
                    req.is_greedy = bool(greedy_BK[b, k])
