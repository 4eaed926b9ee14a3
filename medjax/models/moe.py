"""Mixtral sparse MoE block: fp32 softmax router → top-k → renormalise → dropless grouped matmul.

Tokens are replicated k times, sorted by their expert, and each expert's contiguous group is
multiplied by that expert's weights with ``jax.lax.ragged_dot`` (no dense loop over experts, no
capacity dropping). The router statistics let the decoder compute HF's ``load_balancing_loss_func`` over all layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from medjax.models.config import ModelConfig
from medjax.models.layers import Linear, _init


class Experts(nnx.Module):
    """Stacked SwiGLU experts: gate/up ``[E, H, I]``, down ``[E, I, H]``."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.dtype = dtype
        self.gate_proj = nnx.Param(_init(rngs.params(), (E, H, I), param_dtype),
                                   logical_axes=("experts", "embed", "mlp"))
        self.up_proj = nnx.Param(_init(rngs.params(), (E, H, I), param_dtype),
                                 logical_axes=("experts", "embed", "mlp"))
        self.down_proj = nnx.Param(_init(rngs.params(), (E, I, H), param_dtype),
                                   logical_axes=("experts", "mlp", "embed"))

    def project(self, name, x_NI, group_sizes_E):
        """One grouped matmul; LoRA/QLoRA wrappers override this per projection."""
        w = getattr(self, name)[...].astype(self.dtype)
        return jax.lax.ragged_dot(x_NI.astype(self.dtype), w, group_sizes_E)

    def __call__(self, x_NH, group_sizes_E):
        h = jax.nn.silu(self.project("gate_proj", x_NH, group_sizes_E)) * \
            self.project("up_proj", x_NH, group_sizes_E)
        return self.project("down_proj", h, group_sizes_E)


class SparseMoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, logical_axes=("embed", None),
                           rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.experts = Experts(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x_BTH, token_mask_BT=None):
        """Returns ``(out_BTH, router_stats [2E + 1])``."""
        B, T, H = x_BTH.shape
        E, K = self.num_experts, self.top_k
        x_NH = x_BTH.reshape(B * T, H)
        probs_NE = jax.nn.softmax(self.gate(x_NH).astype(jnp.float32), axis=-1)
        weights_NK, experts_NK = jax.lax.top_k(probs_NE, K)
        weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)

        flat_expert = experts_NK.reshape(-1)                       # [N*K]
        order = jnp.argsort(flat_expert, stable=True)
        token_of = order // K                                      # source token of each row
        group_sizes_E = jnp.bincount(flat_expert, length=E).astype(jnp.int32)
        y_MH = self.experts(x_NH[token_of], group_sizes_E)         # rows sorted by expert
        y_MH = y_MH.astype(jnp.float32) * weights_NK.reshape(-1)[order][:, None]
        out_NH = jnp.zeros((B * T, H), jnp.float32).at[token_of].add(y_MH)

        # Router statistics for HF's load_balancing_loss_func (aggregated over layers by the
        # decoder): routed-slot counts per expert, summed probabilities per expert, token count.
        mask_N = (jnp.ones((B * T,), jnp.float32) if token_mask_BT is None
                  else token_mask_BT.reshape(-1).astype(jnp.float32))
        counts_E = jnp.einsum("nke,n->e", jax.nn.one_hot(experts_NK, E, dtype=jnp.float32), mask_N)
        probs_E = jnp.einsum("ne,n->e", probs_NE, mask_N)
        stats = jnp.concatenate([counts_E, probs_E, jnp.sum(mask_N)[None]])
        return out_NH.reshape(B, T, H).astype(x_BTH.dtype), stats


def load_balancing_loss(stats, num_experts: int):
    """HF Mixtral aux loss from summed router stats ``[2E + 1]``: E · Σ_e f_e · P_e."""
    rows = jnp.maximum(stats[-1], 1.0)
    return num_experts * jnp.sum((stats[:num_experts] / rows) * (stats[num_experts:2 * num_experts] / rows))
