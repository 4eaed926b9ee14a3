import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.config import ConfigError, OptimSection
from medjax.train.optimizer import decay_mask, make_optimizer, make_schedule


def test_warmup_cosine_matches_formula():
    cfg = OptimSection(lr=1e-3, min_lr=1e-8, warmup_steps=10, schedule="cosine")
    sched = make_schedule(cfg, total_steps=110)
    for step in (0, 5, 10, 60, 109, 110):
        if step < 10:
            want = 1e-3 * step / 10
        else:
            frac = (step - 10) / 100
            want = 1e-8 + (1e-3 - 1e-8) * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(sched(step)) == pytest.approx(want, rel=1e-4, abs=1e-9)


def test_linear_and_constant():
    lin = make_schedule(OptimSection(lr=1.0, min_lr=0.0, schedule="linear"), 100)
    assert float(lin(0)) == 1.0 and float(lin(50)) == pytest.approx(0.5) and float(lin(100)) == 0.0
    const = make_schedule(OptimSection(lr=0.3, schedule="constant", warmup_steps=3), 100)
    assert float(const(1)) == pytest.approx(0.1) and float(const(80)) == pytest.approx(0.3)


def test_weight_decay_masked_off_norms_and_biases():
    params = {"layers": {"q_proj": {"kernel": jnp.ones((4, 4))}, "input_layernorm": {"scale": jnp.ones((4, 4))},
                         "o": {"bias": jnp.ones((4, 4))}}}
    mask = decay_mask(params)
    assert mask["layers"]["q_proj"]["kernel"] and not mask["layers"]["input_layernorm"]["scale"]
    assert not mask["layers"]["o"]["bias"]
    cfg = OptimSection(lr=0.1, weight_decay=0.5, schedule="constant", clip_norm=None)
    tx, _ = make_optimizer(cfg, 10)
    state = tx.init(params)
    zeros = jax_tree_zeros(params)
    updates, _ = tx.update(zeros, state, params)
    np.testing.assert_allclose(updates["layers"]["q_proj"]["kernel"], -0.1 * 0.5 * np.ones((4, 4)), rtol=1e-6)
    assert float(jnp.abs(updates["layers"]["input_layernorm"]["scale"]).max()) == 0.0


def test_adamw_matches_optax_reference_with_clipping():
    cfg = OptimSection(lr=1e-2, b1=0.9, b2=0.95, eps=1e-5, schedule="constant", clip_norm=0.5)
    tx, _ = make_optimizer(cfg, 10)
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2, b1=0.9, b2=0.95, eps=1e-5))
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    grads = {"w": jnp.linspace(-3, 3, 6).reshape(2, 3)}
    up, _ = tx.update(grads, tx.init(params), params)
    up_ref, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(up["w"], up_ref["w"], rtol=1e-6)


def test_adafactor_runs():
    tx, _ = make_optimizer(OptimSection(name="adafactor", lr=1e-2), 10)
    params = {"w": jnp.ones((256, 256))}
    up, _ = tx.update({"w": jnp.ones((256, 256))}, tx.init(params), params)
    assert jnp.isfinite(up["w"]).all()


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="optim.b2"):
        OptimSection(b2=1.5)
    with pytest.raises(ConfigError, match="optim.min_lr"):
        OptimSection(lr=1e-4, min_lr=1e-3)


def jax_tree_zeros(tree):
    import jax
    return jax.tree.map(jnp.zeros_like, tree)
