"""Mixtral sparse MoE block: fp32 softmax router → top-k → renormalise → dropless grouped matmul.

Tokens are replicated k times, sorted by their expert, and each expert's contiguous group is
multiplied by that expert's weights with ``medjax.ops.grouped_matmul`` (cost follows the routed
rows: no dense loop over experts, no capacity dropping). The rows are gathered straight into the
grouped matmul's block layout (each expert's group padded to whole blocks), so the three
projections and their backward pass run without further padding copies.

Cost of one layer (N tokens, k experts each, hidden H, ffn I, E experts; :func:`moe_layer_cost`):
forward 2·N·H·E (router) + 3·2·N·k·H·I (experts), backward twice that; the expert matmuls run
on at most N·k + min(E, N·k)·(b − 1) padded rows (b = block rows). With an ``expert`` mesh axis
> 1 the rows travel to the devices holding their experts and back (``moe_dispatch.py``).
The router statistics let the decoder compute HF's ``load_balancing_loss_func`` over all layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from medjax.models.config import ModelConfig
from medjax.models.layers import Linear, _init
from medjax.models.moe_dispatch import moe_layer
from medjax.ops.grouped_matmul import grouped_matmul


EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Experts(nnx.Module):
    """Stacked SwiGLU experts: gate/up ``[E, H, I]``, down ``[E, I, H]`` (``EXPERT_PROJECTIONS``)."""

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
        """One grouped matmul; LoRA/QLoRA wrappers override this per projection.
        ``group_sizes_E``: sizes ``[E]`` of the sorted rows' groups, or a ``BlockLayout``."""
        w = getattr(self, name)[...].astype(self.dtype)
        return grouped_matmul(x_NI.astype(self.dtype), w, group_sizes_E)

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
        mask_N = (jnp.ones((B * T,), jnp.float32) if token_mask_BT is None
                  else token_mask_BT.reshape(-1).astype(jnp.float32))
        # Route, send the rows to their experts and back: on this device, or (with an `expert`
        # mesh axis > 1) each device routes its own tokens and exchanges rows with all-to-alls.
        out_NH, stats = moe_layer(self, x_BTH.reshape(B * T, H), mask_N)
        return out_NH.reshape(B, T, H).astype(x_BTH.dtype), stats

    def route(self, x_NH, mask_N):
        """``(weights_NK, experts_NK, router_stats [2E + 1])``: fp32 softmax → top-k → renormalise.
        The statistics feed HF's load_balancing_loss_func (aggregated over layers by the
        decoder): routed-slot counts per expert, summed probabilities per expert, token count."""
        E, K = self.num_experts, self.top_k
        probs_NE = jax.nn.softmax(self.gate(x_NH).astype(jnp.float32), axis=-1)
        weights_NK, experts_NK = jax.lax.top_k(probs_NE, K)
        weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)
        counts_E = jnp.einsum("nke,n->e", jax.nn.one_hot(experts_NK, E, dtype=jnp.float32), mask_N)
        probs_E = jnp.einsum("ne,n->e", probs_NE, mask_N)
        return weights_NK, experts_NK, jnp.concatenate([counts_E, probs_E, jnp.sum(mask_N)[None]])


def load_balancing_loss(stats, num_experts: int):
    """HF Mixtral aux loss from summed router stats ``[2E + 1]``: E · Σ_e f_e · P_e."""
    rows = jnp.maximum(stats[-1], 1.0)
    return num_experts * jnp.sum((stats[:num_experts] / rows) * (stats[num_experts:2 * num_experts] / rows))


def moe_layer_cost(cfg: ModelConfig, tokens: int, dtype_bytes: int = 4,
                   gathered_weight_bytes: float = 0) -> dict:
    """FLOPs and temporaries of one MoE layer, forward + backward, for ``tokens`` tokens.

    ``active_flops``: router + the k routed experts' three matmuls (backward = 2× forward).
    ``max_flops``: the same with every expert's rows padded to whole blocks (the grouped
    matmul's worst case). ``temp_bytes``: four ``[P, I]`` buffers live at the backward's peak
    (gate/up/hidden rows and one cotangent), four ``[P, H]`` ones (gathered input, output rows,
    dx of gate and up) and two weight column chunks (a block's weight slice and its ``dw``
    product): XLA:CPU's ``memory_analysis`` reported 1.38 GB of temporaries for Mixtral-8x7B at
    2048 tokens in fp32, this gives 1.41. ``gathered_weight_bytes``: the layer's expert weights
    as each device holds them whole while the layer runs (all-gathered over ``fsdp``: the
    planner passes them when the batch is split over devices without an ``expert`` axis,
    moe_dispatch.py); on a compile-only v5p-16 MELT-Mixtral step (bf16, fsdp=8) the three
    all-gathered ``[E, H, I]`` stacks (0.875 GiB each) are live at the backward's peak beside
    five ``[P, I]`` and four ``[P, H]`` row buffers.
    """
    from medjax.ops.grouped_matmul import column_chunks, default_block_rows, max_blocks
    E, k, H, I = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.intermediate_size
    rows = tokens * k
    b = default_block_rows(rows, E)
    padded = max_blocks(rows, E, b) * b
    router = 2 * tokens * H * E
    chunk = max(H * column_chunks(H, I)[1], I * column_chunks(I, H)[1])
    return {"active_flops": 3 * (router + 3 * 2 * rows * H * I),
            "max_flops": 3 * (router + 3 * 2 * padded * H * I),
            "block_rows": b, "padded_rows": padded,
            "temp_bytes": dtype_bytes * (4 * padded * H + 4 * padded * I + 2 * chunk)
            + gathered_weight_bytes}
