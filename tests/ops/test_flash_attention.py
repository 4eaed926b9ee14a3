"""Pallas flash attention (interpret mode on CPU) vs the XLA reference: output and dq/dk/dv."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from medjax.ops.pallas import blocks, flash_attention

from attention_checks import check_against_reference, random_qkv

# Small blocks so that a handful of tokens already spans several blocks.
flash16 = functools.partial(flash_attention, block_q=16, block_k=16, backend="interpret")


def packed_segments(B, lengths):
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    return jnp.asarray(np.broadcast_to(seg, (B, len(seg))), jnp.int32)


@pytest.mark.parametrize("causal,Hq,Hkv", [(True, 4, 4), (False, 4, 1), (True, 8, 1)])
def test_causal_and_gqa_ratios(causal, Hq, Hkv):
    # T = 37 is not a multiple of the 16-token block.
    check_against_reference(flash16, T=37, Hq=Hq, Hkv=Hkv, causal=causal)


def test_sliding_window_shorter_than_sequence():
    check_against_reference(flash16, T=48, Hq=4, Hkv=1, causal=True, sliding_window=9)


def test_three_packed_segments_of_uneven_length():
    seg = packed_segments(2, (7, 22, 11))
    check_against_reference(flash16, T=40, Hq=4, Hkv=2, causal=True, segment_ids=seg)


@pytest.mark.parametrize("S", [1, 29])
def test_single_query_token(S):
    check_against_reference(flash16, T=1, S=S, Hq=4, Hkv=1, causal=True)


def test_bf16_head_dim_128_all_masks():
    seg = packed_segments(1, (30, 19))
    check_against_reference(flash16, B=1, T=49, Hq=8, Hkv=2, D=128, dtype=jnp.bfloat16,
                            causal=True, sliding_window=20, segment_ids=seg)


def test_heads_first_layout_used_on_tpu():
    seg = packed_segments(2, (13, 20))
    fn = functools.partial(flash16, heads_first=True)
    check_against_reference(fn, T=33, Hq=4, Hkv=2, causal=True, sliding_window=11,
                            segment_ids=seg)


def test_ragged_cache_positions_and_empty_rows():
    # Queries at custom positions against a longer key sequence with per-sequence lengths;
    # batch 1 has kv_length 0, so its rows see nothing: output and grads must be exactly 0.
    B, T, S = 2, 20, 45
    q_pos = jnp.asarray([np.arange(T) + 10, np.arange(T) + 25], jnp.int32)
    check_against_reference(flash16, B=B, T=T, S=S, Hq=4, Hkv=2, causal=True,
                            q_positions=q_pos, kv_lengths=jnp.asarray([40, 0]))
    q, k, v, _ = random_qkv(1, B, T, S, 4, 2, 64, jnp.float32)
    out = flash16(q, k, v, q_positions=q_pos, kv_lengths=jnp.asarray([40, 0]))
    assert np.all(np.asarray(out[1]) == 0.0)


def test_block_ranges_skip_masked_blocks():
    # Causal: query block i visits key blocks [0, i]; window 16 with 16-blocks: [i-1, i].
    pos = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (1, 64))
    seg = jnp.zeros((1, 64), jnp.int32)
    vis = blocks.block_visibility(pos, seg, pos, seg, block_q=16, block_k=16, causal=True,
                                  window=None)
    lo, hi = blocks.visible_range(vis)
    assert lo.tolist() == [[0, 0, 0, 0]] and hi.tolist() == [[1, 2, 3, 4]]
    vis = blocks.block_visibility(pos, seg, pos, seg, block_q=16, block_k=16, causal=True,
                                  window=16)
    lo, hi = blocks.visible_range(vis)
    assert lo.tolist() == [[0, 0, 1, 2]] and hi.tolist() == [[1, 2, 3, 4]]
    # Packed segments: a query block inside segment 2 never visits segment-1 blocks.
    seg = packed_segments(1, (32, 32))
    vis = blocks.block_visibility(pos, seg, pos, seg, block_q=16, block_k=16, causal=True,
                                  window=None)
    lo, hi = blocks.visible_range(vis)
    assert lo.tolist() == [[0, 0, 2, 2]] and hi.tolist() == [[1, 2, 3, 4]]


def test_poisoned_outputs_catch_unwritten_elements():
    # The poison switch itself must work: a kernel that writes half its output shows NaN.
    cfg = blocks.KernelConfig(scale=1.0, causal=False, window=None, masked=False, block_q=16,
                              block_k=16, backend="interpret", heads_first=False, fp32=True)

    def half_writer(x_ref, o_ref):
        o_ref[pl.ds(0, 8), :] = x_ref[pl.ds(0, 8), :]

    spec = pl.BlockSpec((16, 16), lambda i: (i, 0))
    with blocks.poisoned_outputs():
        call = blocks.pallas_call(half_writer, cfg, grid=(2,), in_specs=[spec], out_specs=spec,
                                  out_shape=jax.ShapeDtypeStruct((32, 16), jnp.float32),
                                  head_dim=16, name="half_writer")
    out = np.asarray(call(jnp.ones((32, 16))))
    assert np.all(out[:8] == 1.0) and np.all(np.isnan(out[8:16]))


def test_rejects_bad_shapes():
    q, k, v, _ = random_qkv(0, 1, 8, 8, 6, 4, 64, jnp.float32)
    with pytest.raises(ValueError, match="not divisible"):
        flash16(q, k, v)


# The TPU-structured kernels (key blocks as an "arbitrary" grid axis, VMEM scratch, scalar-
# prefetched block ranges with clamped index maps; flash_attention_tpu.py) in interpret mode.
flash16_tpu = functools.partial(flash_attention, block_q=16, block_k=16,
                                backend="mosaic_interpret")


def test_tpu_kernels_causal_gqa_uneven_length():
    check_against_reference(flash16_tpu, T=37, Hq=8, Hkv=2, causal=True)


def test_tpu_kernels_window_and_packed_segments_bf16():
    seg = packed_segments(2, (7, 22, 11))
    check_against_reference(flash16_tpu, T=40, Hq=4, Hkv=2, D=128, dtype=jnp.bfloat16,
                            causal=True, sliding_window=9, segment_ids=seg)


def test_tpu_kernels_ragged_cache_and_empty_rows():
    B, T, S = 2, 20, 45
    q_pos = jnp.asarray([np.arange(T) + 10, np.arange(T) + 25], jnp.int32)
    check_against_reference(flash16_tpu, B=B, T=T, S=S, Hq=4, Hkv=2, causal=True,
                            q_positions=q_pos, kv_lengths=jnp.asarray([40, 0]))
