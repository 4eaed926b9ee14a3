"""grouped_matmul against jax.lax.ragged_dot (forward and gradients), and its compiled cost."""
import dataclasses
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hlo_flops import dot_flops  # noqa: E402

from medjax.models import get_preset  # noqa: E402
from medjax.models.moe import SparseMoE, moe_layer_cost  # noqa: E402
from medjax.ops.grouped_matmul import (block_layout, default_block_rows, grouped_matmul,  # noqa: E402
                                       grouped_matmul_reference, max_blocks, num_blocks)

CASES = [([3, 0, 5, 9, 0, 1], False, 4),        # uneven, empty experts
         ([0, 0, 18, 0, 0, 0], True, None),       # one expert takes all; default block rows
         ([2, 3, 4, 0, 1, 0], True, 4)]           # 8 rows routed nowhere (come out zero)


@pytest.mark.parametrize("sizes,transpose_rhs,block_rows", CASES)
def test_matches_ragged_dot_forward_and_gradients(sizes, transpose_rhs, block_rows):
    M, K, N = 18, 7, 5
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (M, K))
    w = jax.random.normal(k[1], (len(sizes), K, N))
    g = jax.random.normal(k[2], (M, N))
    gs = jnp.array(sizes, jnp.int32)
    w_arg = jnp.swapaxes(w, 1, 2) if transpose_rhs else w

    def ours(x, w_arg):
        y = grouped_matmul(x, w_arg, gs, transpose_rhs=transpose_rhs, block_rows=block_rows)
        return jnp.sum(y * g), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(ours, (0, 1), has_aux=True))(x, w_arg)
    np.testing.assert_allclose(y, jax.lax.ragged_dot(x, w, gs), atol=1e-5)
    rx, rw = jax.grad(lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, gs) * g), (0, 1))(x, w)
    np.testing.assert_allclose(dx, rx, atol=1e-5)
    np.testing.assert_allclose(dw, jnp.swapaxes(rw, 1, 2) if transpose_rhs else rw, atol=1e-5)
    assert float(jnp.abs(dw[np.asarray(sizes) == 0]).max()) == 0.0           # empty experts


def test_ragged_dot_branch_and_padded_layout_agree():
    """The TPU branch (ragged_dot on padded groups) and the blocked one, on a BlockLayout."""
    gs = jnp.array([5, 0, 2, 9], jnp.int32)
    x = jax.random.normal(jax.random.key(1), (16, 6))
    w = jax.random.normal(jax.random.key(2), (4, 6, 3))
    layout = block_layout(gs, 16, 4)
    x_P = layout.pad(x)
    want_dw = jax.grad(lambda w: jnp.sum(jax.lax.ragged_dot(x, w, gs)))(w)
    for impl in ("blocked", "ragged_dot"):
        def f(w):
            y_P = grouped_matmul(x_P, w, layout, implementation=impl)
            return jnp.sum(y_P), layout.unpad(y_P)
        dw, y = jax.jit(jax.grad(f, has_aux=True))(w)
        np.testing.assert_allclose(y, jax.lax.ragged_dot(x, w, gs), atol=1e-5)
        np.testing.assert_allclose(dw, want_dw, atol=1e-5)


def _compiled_dot_flops(fn, *args, trips):
    return dot_flops(jax.jit(fn).lower(*args).compile().as_text(), _trips(trips))


_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _trips(blocks):
    """Every grouped matmul is a loop over the used groups holding a loop over each group's
    blocks (``blocks`` trips in all, so the outer loop counts once), which may hold a loop over
    the weight's column chunks (a static trip count XLA states)."""
    def trips(line, inner):
        if any(not _KNOWN_TRIPS.search(w) for w in inner):
            return 1                               # the loop over groups
        known = _KNOWN_TRIPS.search(line)
        return int(known.group(1)) if known else blocks
    return trips


def test_decode_pays_only_the_used_experts():
    """One token, top-2 of 8 experts: 2 blocks of 8 rows, not a block per expert."""
    E, K, N = 8, 64, 96
    gs = jnp.zeros((E,), jnp.int32).at[jnp.array([1, 6])].set(1)
    b = default_block_rows(2, E)
    assert (b, max_blocks(2, E, b), int(num_blocks(gs, b))) == (8, 2, 2)
    x, w = jnp.ones((2, K)), jnp.ones((E, K, N))
    flops, loops = _compiled_dot_flops(lambda x, w: grouped_matmul(x, w, gs), x, w, trips=2)
    assert loops == 2 and flops == 2 * (2 * 8) * K * N          # vs E * 8 rows for ragged_dot
    loss = lambda x, w: jnp.sum(grouped_matmul(x, w, gs) ** 2)  # noqa: E731
    frozen, _ = _compiled_dot_flops(jax.value_and_grad(loss), x, w, trips=2)
    full, _ = _compiled_dot_flops(jax.value_and_grad(loss, (0, 1)), x, w, trips=2)
    assert (frozen, full) == (2 * flops, 3 * flops)              # frozen w: no dw loop


@pytest.mark.parametrize("implementation", ["blocked", "ragged_dot"])
def test_frozen_weights_get_no_weight_gradient_under_remat(implementation):
    """A frozen base (LoRA on the experts: the gradient is taken w.r.t. the adapters and the
    rows only) under ``jax.checkpoint``, as training runs it: the backward computes dx and
    nothing of ``w``'s shape; asked for ``w`` too, it does (the check can fail). Forward and dx
    equal the dense reference's."""
    E, K, N = 4, 16, 24
    gs = jnp.array([5, 0, 7, 4], jnp.int32)
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, (16, K)), jax.random.normal(kw, (E, K, N))

    def loss(x, w, fn):
        return jnp.sum(jax.checkpoint(fn)(x, w) ** 2)

    def ours(x, w):
        return grouped_matmul(x, w, gs, block_rows=4, implementation=implementation)

    def reference(x, w):
        return grouped_matmul_reference(x, w, gs)

    def w_shaped(argnums):
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums), static_argnums=2)(x, w, ours)
        avals = [v.aval for eqn in _all_eqns(jaxpr.jaxpr) for v in eqn.outvars]
        return [a for a in avals if getattr(a, "shape", None) == w.shape]

    assert not w_shaped(0) and w_shaped((0, 1))
    np.testing.assert_allclose(ours(x, w), reference(x, w), atol=1e-4)
    np.testing.assert_allclose(jax.grad(loss)(x, w, ours), jax.grad(loss)(x, w, reference),
                               atol=1e-3)


def _all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (loops, custom_vjp, remat)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


@pytest.fixture(scope="module")
def mixtral_layer():
    """One Mixtral-8x7B MoE layer at 2048 tokens, fwd+bwd, compiled (fp32) but never run."""
    cfg = get_preset("mixtral-8x7b")
    tokens, H, I = 2048, cfg.hidden_size, cfg.intermediate_size
    moe = nnx.eval_shape(lambda: SparseMoE(cfg, rngs=nnx.Rngs(0)))
    graph, state = nnx.split(moe)

    def loss(state, x):
        y, stats = nnx.merge(graph, state)(x)
        return jnp.sum(y) + stats[0]

    layer = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(
        state, jax.ShapeDtypeStruct((1, tokens, H), jnp.float32)).compile()

    def dense(ws, x):                                       # the same active rows, one weight set
        h = jax.nn.silu(x @ ws[0]) * (x @ ws[1])
        return jnp.sum(h @ ws[2])

    S = jax.ShapeDtypeStruct
    dense_c = jax.jit(jax.value_and_grad(dense, (0, 1))).lower(
        (S((H, I), jnp.float32), S((H, I), jnp.float32), S((I, H), jnp.float32)),
        S((tokens * cfg.num_experts_per_tok, H), jnp.float32)).compile()
    return cfg, tokens, layer, dense_c


def test_mixtral_layer_compiled_flops_follow_active(mixtral_layer):
    cfg, tokens, layer, _ = mixtral_layer
    rows = tokens * cfg.num_experts_per_tok
    trips = max_blocks(rows, cfg.num_experts, default_block_rows(rows, cfg.num_experts))
    flops, loops = dot_flops(layer.as_text(), _trips(trips))   # worst-case routing
    # 3 projections × (forward, backward) × (groups, blocks, column chunks)
    assert loops == 18
    active = moe_layer_cost(cfg, tokens)["active_flops"]
    assert active == pytest.approx(4.33e12, rel=0.01)
    assert flops <= 1.25 * active, (flops / active)
    # cost_analysis counts each loop body once; the trip-count walk must exceed it.
    assert layer.cost_analysis()["flops"] < flops


def test_mixtral_layer_temporaries(mixtral_layer):
    cfg, tokens, layer, dense_c = mixtral_layer
    temp = layer.memory_analysis().temp_size_in_bytes
    ratio = temp / dense_c.memory_analysis().temp_size_in_bytes
    assert ratio <= 2.0, ratio    # measured 1.96 (docs/SCALE.md#moe-layer)
    # the planner's estimate of the layer's temporaries (medjax.plan's MoE line)
    assert moe_layer_cost(cfg, tokens)["temp_bytes"] == pytest.approx(temp, rel=0.05)


def test_moe_layer_cost_counts(mixtral_layer):
    cfg = dataclasses.replace(get_preset("tiny-mixtral"))
    c = moe_layer_cost(cfg, 10)
    H, I, E, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    assert c["active_flops"] == 3 * (2 * 10 * H * E + 3 * 2 * 10 * k * H * I)


@pytest.mark.slow
def test_tpu_mixtral_layer_compiled_flops_within_10_percent_of_active():
    """The product command compiles one Mixtral-8x7B MoE layer (bf16, 2048 tokens, fwd+bwd) for
    a compile-only v5p with libtpu: forward and dx are native ``ragged_dot``s on the routed rows,
    dw the blocked loop (its remaining trips added at worst-case routing)."""
    import subprocess

    from medjax.ops.pallas import tpu_compile
    if not tpu_compile.TPU_VENV_PYTHON.exists():
        pytest.skip(f"no {tpu_compile.TPU_VENV_PYTHON}: run `make tpu-venv`")
    res = subprocess.run([str(tpu_compile.TPU_VENV_PYTHON), "-m", "medjax.bench", "moe",
                          "--tpu-compile", "v5p:2x2x1"], env=tpu_compile.compile_only_env(),
                         capture_output=True, text=True, timeout=900)
    m = re.search(r"compiled ([0-9.]+) TFLOP .* / active ([0-9.]+) = ([0-9.]+);", res.stdout)
    assert m, res.stdout + res.stderr[-3000:]
    compiled, active, ratio = map(float, m.groups())
    assert active == pytest.approx(4.33, rel=0.01)
    assert 1.0 <= ratio <= 1.10, res.stdout
