"""The batched/bucketed/shared-context scorer equals a naive one-request-at-a-time forward."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax.eval.requests import Item, Request
from medjax.eval.scorer import Scorer
from medjax.models import get_preset, init_decoder


PAD_TO = 64


@jax.jit
def _log_probs(state, inp):
    return jax.nn.log_softmax(nnx.merge(GRAPHDEF, state)(inp)[0], axis=-1)


def naive_loglikelihood(model, req):
    """Right-padded single sequence (causal: padding cannot change earlier positions)."""
    tokens = list(req.context_tokens) + list(req.continuation_tokens)
    inp = np.zeros((1, PAD_TO), np.int32)
    inp[0, : len(tokens) - 1] = tokens[:-1]
    lp = _log_probs(nnx.state(model), jnp.asarray(inp))[: len(tokens) - 1]
    n = len(req.continuation_tokens)
    cont_lp = lp[-n:]
    target = jnp.asarray(req.continuation_tokens)
    ll = float(jnp.take_along_axis(cont_lp, target[:, None], axis=-1).sum())
    greedy = bool(jnp.all(jnp.argmax(cont_lp, -1) == target))
    return ll, greedy


def random_items(max_cont, n=9, seed=0):
    """Items with random contexts (3-44 tokens) and 2-4 continuations of 1..max_cont tokens."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        ctx = tuple(int(t) for t in rng.integers(0, 512, size=rng.integers(3, 45)))
        reqs = [Request(ctx, tuple(int(t) for t in rng.integers(0, 512, size=rng.integers(1, max_cont + 1))))
                for _ in range(rng.integers(2, 5))]
        if i == 3:  # a duplicate continuation in the same context
            reqs.append(Request(ctx, reqs[0].continuation_tokens))
        items.append(Item("t", i, {}, "", [""] * len(reqs), [""] * len(reqs), 0, reqs))
    return items


@pytest.mark.parametrize("max_cont,tied,pack_length", [(1, False, 64), (1, False, None), (5, False, 64),
                                                       (1, True, 30)])
def test_scorer_matches_naive(max_cont, tied, pack_length):
    """pack_length=64: letter contexts packed several to a row; 30: some too long to pack;
    None: the unpacked bucket path."""
    global GRAPHDEF
    cfg = dataclasses.replace(get_preset("tiny-llama3"), tie_word_embeddings=tied)
    model = init_decoder(cfg, seed=1)
    GRAPHDEF = nnx.graphdef(model)
    items = random_items(max_cont)
    Scorer(model, tokens_per_batch=192, pack_length=pack_length).score(items)
    for item in items:
        for req in item.requests:
            ll, greedy = naive_loglikelihood(model, req)
            assert abs(req.loglikelihood - ll) < 1e-4, (req, ll)
            assert req.is_greedy == greedy


def test_pack_rows_first_fit_decreasing():
    from medjax.eval.scorer import pack_rows
    lengths = [5, 9, 3, 7, 1, 8, 2]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4            # 35 tokens need 4 rows of 10; FFD finds it


def test_plan_buckets_covers_everything_and_trades_padding_for_shapes():
    from medjax.eval.scorer import plan_buckets
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 600, 500).tolist()
    for compile_cost in (0, 10**9):
        plan = plan_buckets(lengths, tokens_per_batch=2048, compile_cost=compile_cost, multiple_of=2)
        assert sorted(i for _, _, ix in plan for i in ix) == list(range(500))
        for length, rows, ix in plan:
            assert length % 8 == 0 and rows % 2 == 0 and max(lengths[i] for i in ix) <= length
        if compile_cost:     # shapes are dear: one bucket
            assert len(plan) == 1
        else:                # shapes are free: many buckets, little padding
            assert len(plan) > 10


@pytest.mark.multidevice
@pytest.mark.parametrize("max_cont", [1, 5])
def test_scorer_on_four_devices_equals_one(max_cont, mesh_devices):
    """Batches split over 4 (simulated) devices: packed, bucketed and KV-cache paths."""
    def scores(devices):
        items = random_items(max_cont)
        with mesh_devices.use(devices):
            Scorer(init_decoder(get_preset("tiny-llama3"), seed=1), tokens_per_batch=192,
                   pack_length=30).score(items)
        return [[r.loglikelihood, r.is_greedy] for it in items for r in it.requests]
    sharded, single = scores(4), scores(1)
    assert len(sharded) == len(single)
    for (ll_4, greedy_4), (ll_1, greedy_1) in zip(sharded, single):
        assert abs(ll_4 - ll_1) < 1e-4 and greedy_4 == greedy_1
