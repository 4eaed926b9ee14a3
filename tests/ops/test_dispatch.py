"""``medjax.ops.attention`` dispatch: implementations, "auto", cuDNN capability checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.ops import attention, attention_reference
from medjax.ops.attention import cudnn_supports, resolve_implementation

from attention_checks import random_qkv, rel_err


def test_auto_is_xla_on_cpu():
    q, k, _, _ = random_qkv(0, 1, 8, 8, 4, 2, 64, jnp.float32)
    assert jax.default_backend() == "cpu"
    assert resolve_implementation(q, k, "auto") == "xla"


def test_unknown_implementation_is_rejected():
    q, k, v, _ = random_qkv(0, 1, 8, 8, 4, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(q, k, v, implementation="flash")


def test_pallas_dispatch_matches_reference_for_prefill_and_decode():
    q, k, v, _ = random_qkv(0, 2, 24, 24, 4, 2, 64, jnp.float32)
    kw = dict(causal=True, sliding_window=10)
    pallas = jax.jit(lambda q, k, v: attention(q, k, v, implementation="pallas", **kw))
    got = pallas(q, k, v)                                    # flash kernel
    assert rel_err(got, attention_reference(q, k, v, **kw)) <= 1e-5
    got = pallas(q[:, -1:], k, v)                            # decode kernel (T=1, S=24)
    assert rel_err(got, attention_reference(q[:, -1:], k, v, **kw)) <= 1e-5


def test_cudnn_capability_reasons():
    q, k, _, _ = random_qkv(0, 1, 8, 8, 4, 2, 64, jnp.bfloat16)
    assert cudnn_supports(q, k, causal=True) is None
    assert "bf16" in cudnn_supports(q.astype(jnp.float32), k, causal=True)
    assert "segment" in cudnn_supports(q, k, segment_ids=jnp.zeros((1, 8), jnp.int32))
    assert "positions" in cudnn_supports(q, k, q_positions=jnp.zeros((1, 8), jnp.int32))
    assert "T != S" in cudnn_supports(q[:, :1], k, causal=True)
    with pytest.raises(NotImplementedError, match="segment"):
        attention(q, k, k, segment_ids=jnp.zeros((1, 8), jnp.int32), implementation="cudnn")


def test_mask_helpers_reexported():
    from medjax.ops import attention_mask
    q, k, _, _ = random_qkv(0, 1, 4, 6, 2, 2, 16, jnp.float32)
    mask = np.asarray(attention_mask(q, k, causal=True))[0]
    # Queries are aligned to the end of the keys: query t sits at position S - T + t.
    np.testing.assert_array_equal(mask, np.tril(np.ones((4, 6), bool), k=2))
