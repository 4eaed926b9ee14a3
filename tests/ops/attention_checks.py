"""Shared checks: run an attention function and the XLA reference, compare output and grads."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medjax.ops.attention import attention_reference
from medjax.ops.pallas import blocks

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rel_err(got, want):
    """||got - want|| / ||want||; absolute when ||want|| < 1 (e.g. dq = 0 exactly for T = S = 1)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1.0))


def random_qkv(seed, B, T, S, Hq, Hkv, D, dtype):
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, Hq, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, Hkv, D), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(kc, (B, T, Hq, D), jnp.float32).astype(dtype)
    return q, k, v, cotangent


def _value_and_grads(fn, q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cotangent))


def check_against_reference(fn, *, seed=0, B=2, T=37, S=None, Hq=4, Hkv=1, D=64,
                            dtype=jnp.float32, grads=True, **mask_kwargs):
    """``fn(q, k, v, **mask_kwargs)`` vs ``attention_reference``: output and dq/dk/dv.

    Runs with poisoned (NaN-initialised) kernel outputs, so unwritten elements fail loudly.
    """
    S = T if S is None else S
    q, k, v, cotangent = random_qkv(seed, B, T, S, Hq, Hkv, D, dtype)
    ref = jax.jit(lambda q, k, v: attention_reference(q, k, v, **mask_kwargs))
    fast = jax.jit(lambda q, k, v: fn(q, k, v, **mask_kwargs))
    if grads:
        ref = jax.jit(lambda *a: _value_and_grads(
            lambda q, k, v: attention_reference(q, k, v, **mask_kwargs), *a, cotangent))
        fast = jax.jit(lambda *a: _value_and_grads(
            lambda q, k, v: fn(q, k, v, **mask_kwargs), *a, cotangent))
    with blocks.poisoned_outputs():
        got = fast(q, k, v)
    want = ref(q, k, v)
    got, want = (got, want) if grads else ((got,), (want,))
    tol = TOLERANCE[dtype]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype)
        assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{name} has NaN/inf (unwritten?)"
        err = rel_err(g, w)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"
