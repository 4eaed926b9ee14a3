"""Building blocks: Linear (HF-transposed kernel), RMSNorm, Embed, SwiGLU MLP, rotary embeddings.

Every parameter carries ``logical_axes`` metadata; ``medjax.sharding`` maps those names to mesh axes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.models.config import ModelConfig
from medjax.ops.target import EXPERT_AXIS, context_mesh


def _init(key, shape, dtype, std=0.02):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ kernel`` with kernel ``[in, out]`` (the transpose of HF's ``weight``); no bias."""

    def __init__(self, in_features, out_features, *, logical_axes, rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = nnx.Param(_init(rngs.params(), (in_features, out_features), param_dtype),
                                logical_axes=logical_axes)

    def __call__(self, x):
        """One 2-D matmul over the flattened tokens. Written as ``einsum("...i,io->...o")`` the
        weight gradient contracts two token dims, and XLA:CPU then writes the output gradient
        transposed inside its elementwise producer (the SwiGLU backward): 20% of a full
        fine-tuning step of SmolLM2 at batch 4 x 512 (issue 38)."""
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        return (x.reshape(-1, self.in_features) @ kernel).reshape(*x.shape[:-1], self.out_features)


class RMSNorm(nnx.Module):
    """HF Llama RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim, *, eps, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab, dim, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype = dtype
        self.embedding = nnx.Param(_init(rngs.params(), (vocab, dim), param_dtype),
                                   logical_axes=("vocab", "embed"))

    def __call__(self, ids_BT):
        table = self.embedding[...]
        mesh = context_mesh()
        if mesh is not None and dict(mesh.shape).get(EXPERT_AXIS, 1) > 1:
            # Expert parallelism (mesh.preset=fsdp_ep, vocab whole): gather the table's
            # fsdp-split columns like any fsdp weight, so the lookup stays on each batch shard.
            # GSPMD otherwise gathers the looked-up rows across the `expert` axis.
            table = jax.lax.with_sharding_constraint(table, NamedSharding(mesh, P()))
        return jnp.take(table, ids_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD):
        """Tied output head: logits against the embedding table (any leading dims)."""
        return jnp.einsum("...d,vd->...v", x_BTD, self.embedding[...].astype(x_BTD.dtype),
                          preferred_element_type=jnp.float32)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        H, I = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(H, I, logical_axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(H, I, logical_axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(I, H, logical_axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# ------------------------------------------------------------------------------ rotary
def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies ``[D/2]``, including linear and llama3 (wavelength-banded) scaling."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x_BTHD, positions_BT, inv_freq):
    """Rotate-half RoPE (HF convention): pairs (i, i + D/2), in fp32. Written per half
    (``x1·cos - x2·sin``, ``x2·cos + x1·sin``: the same fp32 operations as HF's
    ``x·cos + rotate_half(x)·sin``, bit for bit) so that XLA fuses it into one bf16 output; the
    rotate-half form left two fp32 half-tensors per call in HBM (TPU: 3 fusions of 2 x
    ``f32[B, T, H, D/2]`` per layer, forward, recompute and backward)."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BTF)[:, :, None, :]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x32 = x_BTHD.astype(jnp.float32)
    half = x32.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTHD.dtype)
