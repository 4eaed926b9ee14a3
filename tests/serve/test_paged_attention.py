"""ops.paged_attention: pages scattered over the pool equal dense attention over the sequence."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from medjax.ops.attention import attention_reference
from medjax.ops.paged_attention import paged_attention, paged_attention_xla


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
