"""The dense XLA path (hand-written backward) equals the reference, forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.ops.attention import attention, attention_reference


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("window,packed,lengths", [(None, False, False), (7, True, False), (None, False, True)])
def test_xla_path_matches_reference(dtype, tol, window, packed, lengths):
    rng = np.random.default_rng(0)
    B, T, S, Hq, Hkv, D = 2, 21, 21, 8, 2, 16
    q, k, v, w = (jnp.asarray(rng.standard_normal(s), dtype) for s in
                  [(B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D), (B, T, Hq, D)])
    kw = dict(sliding_window=window)
    if packed:
        kw["segment_ids"] = jnp.asarray(np.repeat([[1] * 6 + [2] * 10 + [0] * 5], B, 0))
    if lengths:
        kw["kv_lengths"] = jnp.asarray([0, 13])  # the first sequence sees no key at all: zeros
    ours = lambda q, k, v: attention(q, k, v, implementation="xla", **kw)  # noqa: E731
    ref = lambda q, k, v: attention_reference(q, k, v, **kw)  # noqa: E731
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(f32(ours(q, k, v)), f32(ref(q, k, v)), atol=tol)
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a).astype(jnp.float32) * w), (0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a).astype(jnp.float32) * w), (0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_ref):
        scale = max(float(np.abs(f32(b)).max()), 1.0)
        assert np.abs(f32(a) - f32(b)).max() <= tol * scale


@pytest.mark.parametrize("T", [256, 300, 520])
@pytest.mark.parametrize("window,packed", [(None, False), (100, True)])
def test_causal_block_skip_matches_reference(T, window, packed):
    """Long self-attention takes the block path (future key tiles skipped): still exact."""
    from medjax.ops.xla_attention import causal_blocks
    assert len(causal_blocks(T)) > 1
    rng = np.random.default_rng(T)
    B, Hq, Hkv, D = 2, 6, 2, 16
    q, w = (jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32) for _ in range(2))
    pos = np.tile(np.arange(T), (B, 1))
    seg = np.ones((B, T), np.int32)
    if packed:   # two documents, positions restart at the boundary, padding at the end
        cut = T // 3
        seg[:, cut:] = 2
        seg[:, T - 7:] = 0
        pos[:, cut:] -= cut
    pos, seg = jnp.asarray(pos), jnp.asarray(seg)
    kw = dict(sliding_window=window, segment_ids=seg, q_positions=pos, kv_positions=pos)
    ours = lambda q, k, v: attention(q, k, v, implementation="xla", **kw)  # noqa: E731
    ref = lambda q, k, v: attention_reference(q, k, v, **kw)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5)
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * w), (0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), (0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4 * max(float(np.abs(b).max()), 1.0))
