"""Compiled kernels on a CUDA GPU vs the XLA reference (skipped without a GPU).

Run on the GPU machine with ``python -m pytest -m gpu tests/ops``.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.ops import attention
from medjax.ops.pallas import decode_attention, flash_attention

from attention_checks import check_against_reference

pytestmark = pytest.mark.gpu

triton = functools.partial(flash_attention, backend="triton")


@pytest.fixture(autouse=True)
def exact_fp32_reference():
    # The reference must not use TF32 on Ampere/Hopper when judging fp32 at 1e-5.
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("mask", [dict(causal=True), dict(causal=False),
                                  dict(causal=True, sliding_window=300)],
                         ids=["causal", "full", "window"])
def test_triton_flash_matches_reference(dtype, mask):
    check_against_reference(triton, B=2, T=1000, Hq=32, Hkv=8, D=128, dtype=dtype, **mask)


def test_triton_flash_packed_segments_head_dim_64():
    seg = np.repeat(np.arange(3), [300, 500, 224])[None].repeat(2, 0)
    check_against_reference(triton, B=2, T=1024, Hq=8, Hkv=1, D=64, dtype=jnp.bfloat16,
                            causal=True, segment_ids=jnp.asarray(seg, jnp.int32))


def test_triton_decode_matches_reference():
    lengths = jnp.asarray([4096, 1000, 7])
    check_against_reference(functools.partial(decode_attention, backend="triton"), B=3, T=1,
                            S=4096, Hq=32, Hkv=8, D=128, dtype=jnp.bfloat16, causal=True,
                            q_positions=(lengths - 1)[:, None], kv_lengths=lengths, grads=False)


@pytest.mark.parametrize("implementation", ["cudnn", "auto"])
def test_cudnn_and_auto_match_reference(implementation):
    fn = functools.partial(attention, implementation=implementation)
    check_against_reference(fn, B=2, T=512, Hq=32, Hkv=8, D=128, dtype=jnp.bfloat16,
                            causal=True, sliding_window=128)
