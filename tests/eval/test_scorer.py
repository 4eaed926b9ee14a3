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


@pytest.mark.parametrize("max_cont,tied", [(1, False), (5, False), (1, True)])
def test_scorer_matches_naive(max_cont, tied):
    global GRAPHDEF
    cfg = dataclasses.replace(get_preset("tiny-llama3"), tie_word_embeddings=tied)
    model = init_decoder(cfg, seed=1)
    GRAPHDEF = nnx.graphdef(model)
    rng = np.random.default_rng(0)
    items = []
    for i in range(9):
        ctx = tuple(int(t) for t in rng.integers(0, 512, size=rng.integers(3, 45)))
        reqs = [Request(ctx, tuple(int(t) for t in rng.integers(0, 512, size=rng.integers(1, max_cont + 1))))
                for _ in range(rng.integers(2, 5))]
        if i == 3:  # a duplicate continuation in the same context
            reqs.append(Request(ctx, reqs[0].continuation_tokens))
        items.append(Item("t", i, {}, "", [""] * len(reqs), [""] * len(reqs), 0, reqs))
    Scorer(model, tokens_per_batch=192).score(items)
    for item in items:
        for req in item.requests:
            ll, greedy = naive_loglikelihood(model, req)
            assert abs(req.loglikelihood - ll) < 1e-4, (req, ll)
            assert req.is_greedy == greedy
