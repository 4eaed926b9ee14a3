"""ops.paged_attention: pages scattered over the pool equal dense attention over the sequence."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from medjax.ops.attention import attention_reference
from medjax.ops.paged_attention import paged_attention, paged_attention_xla, resolve_implementation


def paged_case(seed=0, B=3, T=1, Hq=4, Hkv=2, D=16, page=4, width=6, lengths=(5, 17, 24)):
    """Random K/V per sequence written into shuffled pages; returns (paged args, dense args)."""
    rng = np.random.default_rng(seed)
    N = B * width + 2
    pool_k = rng.normal(size=(N, Hkv, page, D)).astype(np.float32)
    pool_v = rng.normal(size=(N, Hkv, page, D)).astype(np.float32)
    perm = rng.permutation(N)
    table = perm[:B * width].reshape(B, width).astype(np.int32)
    S = page * width
    dense_k = pool_k[table].swapaxes(2, 3).reshape(B, S, Hkv, D)
    dense_v = pool_v[table].swapaxes(2, 3).reshape(B, S, Hkv, D)
    q = rng.normal(size=(B, T, Hq, D)).astype(np.float32)
    lengths = np.asarray(lengths, np.int32)
    q_pos = lengths[:, None] - T + np.arange(T)[None, :]
    return (q, pool_k, pool_v, table, lengths, q_pos), (dense_k, dense_v)


@pytest.mark.parametrize("T,window,ppb", [(1, None, 2), (3, None, 8), (1, 5, 1), (2, 7, 4)])
def test_xla_matches_dense_reference(T, window, ppb):
    (q, pk, pv, table, lengths, q_pos), (k, v) = paged_case(T=T)
    got = paged_attention_xla(q, pk, pv, table, lengths, q_positions=q_pos, sliding_window=window,
                              pages_per_block=ppb)
    want = attention_reference(q, k, v, sliding_window=window, q_positions=q_pos,
                               kv_lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_keys_past_the_length_are_never_seen():
    (q, pk, pv, table, lengths, q_pos), _ = paged_case()
    base = paged_attention(q, pk, pv, table, lengths, q_positions=q_pos)
    garbage = np.array(pk)
    for b, n in enumerate(lengths):            # overwrite every slot at or past each length
        page = pk.shape[2]
        for p in range(n, table.shape[1] * page):
            garbage[table[b, p // page], :, p % page] = 1e6
    np.testing.assert_array_equal(paged_attention(q, garbage, pv, table, lengths, q_positions=q_pos),
                                  base)


def test_work_follows_lengths_not_table_width():
    """One program for every length: the loop's trip count is data, not a shape."""
    (q, pk, pv, table, lengths, q_pos), _ = paged_case()
    f = jax.jit(paged_attention_xla)
    f(q, pk, pv, table, lengths)
    f(q, pk, pv, table, np.array([1, 2, 3], np.int32))
    assert f._cache_size() == 1


@pytest.mark.parametrize("T,window", [(1, None), (2, None), (1, 6)])
def test_pallas_kernel_matches_xla_in_interpret_mode(T, window):
    from medjax.ops.pallas.paged_attention import paged_decode_attention
    (q, pk, pv, table, lengths, q_pos), _ = paged_case(T=T, page=8, D=32)
    got = paged_decode_attention(q, pk, pv, table, lengths, q_positions=q_pos,
                                 sliding_window=window, backend="mosaic_interpret")
    want = paged_attention_xla(q, pk, pv, table, lengths, q_positions=q_pos, sliding_window=window)
    np.testing.assert_allclose(got, want, atol=2e-5)


def _poison_unread_pages(pool, table, lengths, q_pos, window):
    """NaN in every page a sequence must never read (wholly past its length or before its
    window), and garbage table entries past the length: a kernel that reads any of them, even
    masked, returns NaN (0 * NaN in p @ v)."""
    pool, table = np.array(pool), np.array(table)
    N, page = pool.shape[0], pool.shape[2]
    rng = np.random.default_rng(1)
    for b, n in enumerate(lengths):
        first = 0 if window is None else max(0, int(q_pos[b].min()) - window + 1) // page
        last = -(-int(n) // page)
        for j in [*range(first), *range(last, table.shape[1])]:
            pool[table[b, j]] = np.nan
        table[b, last:] = rng.choice([N, N + 7, -3, *table[b, :last]], table.shape[1] - last)
    return pool, table


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("T,window,Hq,splits", [(1, None, 2, 1), (1, None, 8, 4), (3, None, 4, 2),
                                                (1, 20, 4, 3), (2, 33, 16, 8)])
def test_triton_kernel_matches_xla_and_dense_in_interpret_mode(dtype, T, window, Hq, splits):
    """The GPU (Triton) form, run in interpret mode: ragged lengths (a part-filled page, one
    page, six), GQA ratios 1-8, draft tokens, windows, garbage past each length."""
    from medjax.ops.pallas.paged_attention import paged_decode_attention
    (q, pk, pv, table, lengths, q_pos), (k, v) = paged_case(T=T, Hq=Hq, D=16, page=16,
                                                            lengths=(9, 16, 96))
    q, pk, pv = (jnp.asarray(x, dtype) for x in (q, pk, pv))
    want = attention_reference(q.astype(jnp.float32), jnp.asarray(k, dtype).astype(jnp.float32),
                               jnp.asarray(v, dtype).astype(jnp.float32), sliding_window=window,
                               q_positions=q_pos, kv_lengths=jnp.asarray(lengths))
    xla = paged_attention_xla(q, pk, pv, table, lengths, q_positions=q_pos, sliding_window=window)
    pk_bad, table_bad = _poison_unread_pages(pk, table, lengths, q_pos, window)
    pv_bad, _ = _poison_unread_pages(pv, table, lengths, q_pos, window)
    got = paged_decode_attention(q, jnp.asarray(pk_bad, dtype), jnp.asarray(pv_bad, dtype),
                                 table_bad, lengths, q_positions=q_pos, sliding_window=window,
                                 num_splits=splits, backend="interpret")
    assert got.dtype == dtype and got.shape == q.shape
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(xla, np.float32), atol=tol)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol)


def test_triton_kernel_default_positions_and_scale():
    """``q_positions=None``: the last T positions of each sequence; ``scale`` is applied."""
    from medjax.ops.pallas.paged_attention import paged_decode_attention
    (q, pk, pv, table, lengths, _), _ = paged_case(T=2, D=16, page=16, lengths=(3, 17, 40))
    got = paged_decode_attention(q, pk, pv, table, lengths, scale=0.3, backend="interpret")
    want = paged_attention_xla(q, pk, pv, table, lengths, scale=0.3)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_triton_kernel_refuses_shapes_triton_cannot_tile():
    from medjax.ops.pallas.paged_attention import paged_decode_attention
    (q, pk, pv, table, lengths, _), _ = paged_case(page=8, D=16)
    with pytest.raises(ValueError, match="page 8, head_dim 16"):
        paged_decode_attention(q, pk, pv, table, lengths, backend="triton")


@pytest.mark.parametrize("platform,page,D,want", [
    ("cuda", 16, 128, "pallas"), ("cuda", 8, 128, "xla"), ("cuda", 16, 80, "xla"),
    ("rocm", 32, 64, "pallas"), ("tpu", 8, 128, "pallas"), ("cpu", 16, 128, "xla")])
def test_auto_picks_the_kernel_by_target_and_shapes(platform, page, D, want):
    assert resolve_implementation("auto", platform, page_size=page, head_dim=D) == want
    assert resolve_implementation("xla", "cuda", page_size=page, head_dim=D) == "xla"
    with pytest.raises(ValueError, match="unknown paged attention implementation"):
        resolve_implementation("triton", "cuda", page_size=page, head_dim=D)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_auto_lowers_to_the_triton_kernel_for_cuda(dtype):
    """Traced for CPU and CUDA (no plugin needed to lower): the CUDA program's only custom call is
    the Pallas Triton kernel, and it has no ``while`` (the XLA path's page loop)."""
    from medjax.ops.target import target_platforms
    S = jax.ShapeDtypeStruct
    args = [S((4, 1, 8, 64), dtype), S((32, 2, 16, 64), dtype), S((32, 2, 16, 64), dtype),
            S((4, 8), jnp.int32), S((4,), jnp.int32)]
    with target_platforms("cpu", "cuda"):
        text = jax.jit(paged_attention).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call") == 1 and "__gpu$xla.gpu.triton" in text
    assert "stablehlo.while" not in text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_kernel_matches_xla_on_a_gpu(dtype):
    """Compiled Triton kernel vs the XLA path on a CUDA GPU, Llama-3-8B attention shapes."""
    B, T, Hq, Hkv, D, page, width = 4, 1, 32, 8, 128, 16, 64
    (q, pk, pv, table, lengths, q_pos), _ = paged_case(
        B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, page=page, width=width, lengths=(1, 100, 517, 1024))
    q, pk, pv = (jnp.asarray(x, dtype) for x in (q, pk, pv))
    with jax.default_matmul_precision("highest"):
        want = paged_attention_xla(q, pk, pv, table, lengths, q_positions=q_pos)
    got = jax.jit(paged_attention)(q, pk, pv, table, lengths, q_positions=q_pos)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)
