"""Pallas decode attention (few queries vs a long ragged KV cache) vs the XLA reference."""
import functools

import jax.numpy as jnp

from medjax.ops.pallas import decode_attention

from attention_checks import check_against_reference

decode16 = functools.partial(decode_attention, block_k=16, num_splits=3, backend="interpret")


def test_one_token_per_sequence_ragged_cache_with_window():
    # Each sequence's next token sits at its own length (right-padded batch of caches).
    lengths = jnp.asarray([70, 23, 1])
    check_against_reference(decode16, B=3, T=1, S=70, Hq=8, Hkv=2, causal=True,
                            sliding_window=30, q_positions=(lengths - 1)[:, None],
                            kv_lengths=lengths)


def test_few_draft_tokens_gqa_8():
    lengths = jnp.asarray([50, 37])
    q_pos = jnp.stack([lengths - 3, lengths - 2, lengths - 1], axis=1)
    check_against_reference(decode16, B=2, T=3, S=50, Hq=8, Hkv=1, causal=True,
                            q_positions=q_pos, kv_lengths=lengths)


def test_bf16_default_positions():
    check_against_reference(decode16, B=2, T=1, S=64, Hq=4, Hkv=4, D=128, dtype=jnp.bfloat16,
                            causal=True, grads=False)


def test_tpu_blocked_cache_ragged_with_window():
    # Key blocks of each split are a grid axis (TPU structure), interpret mode; grads go
    # through the TPU-structured flash backward.
    decode_tpu = functools.partial(decode_attention, block_k=16, num_splits=3,
                                   backend="mosaic_interpret")
    lengths = jnp.asarray([70, 23, 1])
    check_against_reference(decode_tpu, B=3, T=1, S=70, Hq=8, Hkv=2, causal=True,
                            sliding_window=30, q_positions=(lengths - 1)[:, None],
                            kv_lengths=lengths)
