"""The batched/bucketed/shared-context scorer equals a naive one-request-at-a-time forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.eval.requests import Item, Request
from medjax.eval.scorer import Scorer
from medjax.models import get_preset, init_decoder


def naive_loglikelihood(model, req):
    tokens = list(req.context_tokens) + list(req.continuation_tokens)
    inp = jnp.asarray([tokens[:-1]], jnp.int32)
    lp = jax.nn.log_softmax(model(inp)[0], axis=-1)
    n = len(req.continuation_tokens)
    cont_lp = lp[-n:]
    target = jnp.asarray(req.continuation_tokens)
    ll = float(jnp.take_along_axis(cont_lp, target[:, None], axis=-1).sum())
    greedy = bool(jnp.all(jnp.argmax(cont_lp, -1) == target))
    return ll, greedy


@pytest.mark.parametrize("max_cont", [1, 5])
def test_scorer_matches_naive(max_cont):
    model = init_decoder(get_preset("tiny-llama3"), seed=1)
    rng = np.random.default_rng(0)
    items = []
    for i in range(11):
        ctx = tuple(int(t) for t in rng.integers(0, 512, size=rng.integers(3, 70)))
        reqs = [Request(ctx, tuple(int(t) for t in rng.integers(0, 512, size=rng.integers(1, max_cont + 1))))
                for _ in range(rng.integers(2, 5))]
        if i == 3:  # a duplicate continuation in the same context
            reqs.append(Request(ctx, reqs[0].continuation_tokens))
        items.append(Item("t", i, {}, "", [""] * len(reqs), [""] * len(reqs), 0, reqs))
    Scorer(model, tokens_per_batch=256).score(items)
    for item in items:
        for req in item.requests:
            ll, greedy = naive_loglikelihood(model, req)
            assert abs(req.loglikelihood - ll) < 1e-4, (req, ll)
            assert req.is_greedy == greedy
