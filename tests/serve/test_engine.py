"""The continuous-batching engine: greedy equals medjax.generate's whatever shares the batch,
no recompiles after warm-up, pages come back, sampling is per request."""
from __future__ import annotations

import numpy as np
import pytest

from medjax.errors import ConfigError
from medjax.eval.generate import Generator
from medjax.models import get_preset, init_decoder
from medjax.serve.engine import (Engine, EngineConfig, QueueFull, Sampling,
                                 Sequence)

CONFIG = EngineConfig(page_size=8, max_slots=4, max_context=64, max_prefill_batch=2,
                      kv_budget_bytes=2 << 20, max_queue=64)


def random_prompts(n, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 500, size=int(k))]
            for k in rng.integers(1, max_len, size=n)]


def run(engine, prompts, max_tokens=10, sampling=None, stop_ids=frozenset()):
    outs = [[] for _ in prompts]
    finish = [None] * len(prompts)

    def emit(i):
        def f(token, reason):
            outs[i].append(token)
            finish[i] = reason
        return f
    seqs = [Sequence(prompt=p, max_tokens=max_tokens, emit=emit(i), stop_ids=stop_ids,
                     sampling=sampling[i] if sampling else Sampling()) for i, p in enumerate(prompts)]
    engine.submit(seqs)
    while engine.step():
        pass
    return outs, finish


@pytest.fixture(scope="module", params=["tiny-llama3", "tiny-mistral"])
def warm(request):
    """(model, engine after warm-up, programs compiled); mistral: sliding window 8."""
    model = init_decoder(get_preset(request.param), seed=3)
    engine = Engine(model, CONFIG)
    return model, engine, engine.warmup()


def test_greedy_equals_generate_in_a_mixed_batch(warm):
    model, engine, programs = warm
    prompts = random_prompts(20)
    outs, finish = run(engine, prompts, max_tokens=12)
    gen = Generator(model)
    for prompt, got in zip(prompts, outs):
        assert got == gen.generate([prompt], max_new_tokens=12)[0]
    assert finish == ["length"] * len(prompts)
    assert engine.compiled_programs() == programs           # nothing compiled after warm-up
    assert engine.allocator.free == engine.allocator.num_pages and not engine.running


def test_requests_join_and_leave_at_every_step(warm):
    """A request submitted while others decode joins at once; short ones leave early."""
    model, engine, programs = warm
    long_prompt, short_prompt = random_prompts(2, seed=5)
    got = {"long": [], "short": []}
    seq = lambda k, p, n: Sequence(prompt=p, max_tokens=n,  # noqa: E731
                                   emit=lambda t, f: got[k].append(t))
    engine.submit([seq("long", long_prompt, 20)])
    for _ in range(5):
        engine.step()
    engine.submit([seq("short", short_prompt, 3)])
    batch_sizes = []
    while engine.step():
        batch_sizes.append(len(engine.running))
    assert 2 in batch_sizes and batch_sizes[-1] <= 1
    gen = Generator(model)
    assert got["long"] == gen.generate([long_prompt], max_new_tokens=20)[0]
    assert got["short"] == gen.generate([short_prompt], max_new_tokens=3)[0]
    assert engine.compiled_programs() == programs


def test_sampling_is_per_request_and_seeded(warm):
    _, engine, _ = warm
    prompt = random_prompts(1, seed=7)[0]
    hot = Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=11)
    alone, _ = run(engine, [prompt], sampling=[hot])
    crowd, _ = run(engine, [prompt] + random_prompts(5, seed=8),
                   sampling=[hot] + [Sampling(temperature=0.7, seed=i) for i in range(5)])
    other_seed, _ = run(engine, [prompt], sampling=[Sampling(temperature=1.0, seed=12)])
    second_choice, _ = run(engine, [prompt], sampling=[Sampling(1.0, 50, 0.9, seed=11, stream=1)])
    assert crowd[0] == alone[0]
    assert other_seed[0] != alone[0] and second_choice[0] != alone[0]


def test_stop_token_ends_a_sequence(warm):
    model, engine, _ = warm
    prompt = random_prompts(1, seed=9)[0]
    free = Generator(model).generate([prompt], max_new_tokens=8)[0]
    outs, finish = run(engine, [prompt], max_tokens=8, stop_ids=frozenset({free[3]}))
    first = free.index(free[3])
    assert outs[0] == free[:first + 1] and finish[0] == "stop"


def test_limits():
    model = init_decoder(get_preset("tiny-llama2"), seed=0)
    engine = Engine(model, EngineConfig(page_size=8, max_context=64, max_queue=2,
                                        kv_budget_bytes=4 * 8 * 2 * 2 * 2 * 16 * 4))   # 4 pages
    assert engine.allocator.num_pages == 4
    with pytest.raises(ConfigError, match="exceeds the context of 64"):
        engine.check(60, 10)
    with pytest.raises(ConfigError, match="needs 5 KV pages; the pool holds 4"):
        engine.check(30, 10)
    seq = lambda: Sequence(prompt=[1, 2], max_tokens=2, emit=lambda t, f: None)  # noqa: E731
    engine.submit([seq(), seq()])
    with pytest.raises(QueueFull, match="2 requests waiting"):
        engine.submit([seq()])
