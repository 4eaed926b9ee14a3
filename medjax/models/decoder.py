"""One decoder for Llama-2/3, Mistral and Mixtral.

embed → N × (RMSNorm → attention → residual, RMSNorm → MLP | sparse MoE → residual) → RMSNorm → head.
Submodule names follow HF (``model.layers.3.self_attn.q_proj``) so import/export is a name table.
With ``scan_layers`` the N layers are ONE module of stacked weights ``[N, ...]`` run by a scan
(``models/stack.py``; params ``model.layers.self_attn.q_proj.kernel [N, in, out]``); without it,
an ``nnx.List`` of N layers run by a Python loop.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from medjax.models.attention import Attention
from medjax.models.config import ModelConfig
from medjax.models.layers import MLP, Embed, Linear, RMSNorm, rope_inv_freq
from medjax.models.moe import SparseMoE, load_balancing_loss
from medjax.models.pipeline import pipeline_layers
from medjax.models.stack import scan_layers, stack_modules
from medjax.ops.target import constrain_rows

REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class KVCache:
    """Per-layer keys/values ``[L, B, S, Hkv, D]``; a token's slot is its position.

    ``forward`` reads layer ``i``'s cache with ``layer(i)`` and stores what the layer returns
    with ``update(i, kv)``; another cache layout (serving's paged pool, ``medjax.serve.pages``)
    provides the same two methods, its layer view an ``attend`` method (models/attention.py)."""
    k: jax.Array
    v: jax.Array

    def layer(self, i: int):
        return self.k[i], self.v[i]

    def update(self, i: int, kv) -> "KVCache":
        return KVCache(k=self.k.at[i].set(kv[0]), v=self.v.at[i].set(kv[1]))


class DecoderOutput(NamedTuple):
    logits: Optional[jax.Array]     # [B, T, V] float32; None from forward(head=False)
    cache: Optional[KVCache]
    aux_loss: jax.Array             # HF Mixtral router load-balancing loss (0 for dense models)
    hidden: Optional[jax.Array] = None   # [B, T, H] final-normed hidden states (head=False)


# fp32 logits elements per row that one chunk of the training loss computes (128 MiB):
# Decoder.token_nll's chunk is the most tokens, a power of two, within it
LOSS_CHUNK_LOGITS = 1 << 25


def logits_nll(logits_BTV, targets_BT):
    """Per-token negative log-likelihood in fp32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)


def loss_chunk(seq_len: int, vocab_size: int) -> int:
    """Tokens per chunk of :meth:`Decoder.token_nll`: the largest power of two (at least 128)
    whose fp32 logits of one row fit ``LOSS_CHUNK_LOGITS``; ``seq_len`` when that covers it
    (one chunk: the plain computation). Llama-2's 32000 vocabulary: 1024, Llama-3's 128256: 256."""
    chunk = max(128, 1 << max(0, (LOSS_CHUNK_LOGITS // vocab_size).bit_length() - 1))
    return min(chunk, seq_len)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype, attention_impl):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, rngs=rngs, attention_impl=attention_impl, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                                param_dtype=param_dtype)
        if cfg.is_moe:
            self.block_sparse_moe = SparseMoE(cfg, rngs=rngs, **kw)
        else:
            self.mlp = MLP(cfg, rngs=rngs, **kw)

    def __call__(self, h_BTH, positions_BT, inv_freq, segment_ids, kv_cache):
        h_BTH = constrain_rows(h_BTH)          # rows split, hidden whole: weights are gathered
        attn_out, kv_cache = self.self_attn(self.input_layernorm(h_BTH), positions_BT, inv_freq,
                                            segment_ids=segment_ids, kv_cache=kv_cache)
        h_BTH = h_BTH + attn_out
        x = self.post_attention_layernorm(h_BTH)
        if hasattr(self, "block_sparse_moe"):
            token_mask = None if segment_ids is None else segment_ids > 0
            mlp_out, router_stats = self.block_sparse_moe(x, token_mask)
        else:
            mlp_out, router_stats = self.mlp(x), jnp.zeros((1,), jnp.float32)
        return h_BTH + mlp_out, kv_cache, router_stats


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of ``model.remat`` ``name`` (not "none"); ValueError names
    the choices."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat {name!r} is not one of none, {', '.join(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def remat_layer(layer: DecoderLayer, policy: str, h_BTH, positions_BT, inv_freq, segment_ids):
    """``layer`` under ``jax.checkpoint`` with ``REMAT_POLICIES[policy]``: ``(h_BTH, router_stats)``.

    The layer is split into its graph and ONE state holding every variable — trainable params,
    frozen LoRA bases, ``QuantizedArray`` codes, a DPO reference's weights, RNG counters — and
    the checkpointed function is pure in that state: it merges a fresh copy of the layer inside,
    runs it, and returns the RNG state it advanced (LoRA dropout), which is written back to the
    caller's layer outside. Gradients reach whichever of those arrays the caller differentiates;
    the rest are plain inputs. (``nnx.remat`` instead writes every variable back across the
    checkpoint trace, which raises ``TraceContextError`` for variables created at another trace
    level than the differentiated ones: frozen bases, quantized codes, reference copies.)
    """
    checkpoint_policy = remat_policy(policy)
    graphdef, state = nnx.split(layer)

    def run(state, h_BTH, positions_BT, inv_freq, segment_ids):
        fresh = nnx.merge(graphdef, state)
        h_BTH, _, stats = fresh(h_BTH, positions_BT, inv_freq, segment_ids, None)
        return h_BTH, stats, nnx.state(fresh, nnx.RngState)

    state, h_BTH = finish_gradients_first(state, h_BTH)
    h_BTH, stats, rng_state = jax.checkpoint(run, policy=checkpoint_policy)(
        state, h_BTH, positions_BT, inv_freq, segment_ids)
    nnx.update(layer, rng_state)
    return h_BTH, stats


@jax.custom_vjp
def finish_gradients_first(weights, h_BTH):
    """Identity. In the backward, the gradient of ``h_BTH`` (what the layer before consumes) is
    released only once every gradient of ``weights`` is formed: an ``optimization_barrier``
    ties it to each gradient's sum of squares (scalars: no gradient is held longer). At a
    layer's input this finishes the layer's weight gradients (dots, reduce-scatters) inside its
    own backward; without it libtpu's scheduler sinks some to the step's end, beside the
    gradient norm, their inputs held that long (Llama-2-7B, v5p-8: 0.45 GiB per chip,
    docs/PERFORMANCE.md). A plain sum, linear, did not hold them there (same peak)."""
    return weights, h_BTH


def _finish_fwd(weights, h_BTH):
    # which weights are differentiated, kept as the residuals' tree structure (() yes, None no):
    # a frozen weight's cotangent is still computed for this function's output, and tied it
    # would be kept
    differentiated = [() if p.perturbed else None for p in jax.tree.leaves(
        weights, is_leaf=lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal))]
    return jax.custom_derivatives.custom_vjp_primal_tree_values((weights, h_BTH)), differentiated


def _finish_bwd(differentiated, cotangents):
    g_weights, g_h = cotangents
    zero = lambda g: isinstance(g, jax.custom_derivatives.SymbolicZero)   # noqa: E731
    leaves, tree = jax.tree.flatten(g_weights, is_leaf=zero)
    kept = [g if d == () and not zero(g) else None for g, d in zip(leaves, differentiated)]
    if not zero(g_h):
        _, g_h = jax.lax.optimization_barrier(
            ([jnp.sum(jnp.square(g)) for g in kept if g is not None], g_h))
    return jax.tree.unflatten(tree, kept), g_h


finish_gradients_first.defvjp(_finish_fwd, _finish_bwd, symbolic_zeros=True)


class Backbone(nnx.Module):
    """HF's ``model.`` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype, attention_impl,
                 scan_layers=False):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)
        layers = [DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                               attention_impl=attention_impl) for _ in range(cfg.num_layers)]
        # the same random draws in both layouts: a seed gives the same weights either way
        self.layers = stack_modules(layers) if scan_layers else nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention_impl: str = "auto", remat: str = "none",
                 scan_layers: bool = False):
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers
        # pipeline parallelism (models/pipeline.py), set by the trainer: the stages and repeats
        # every call runs; repeats > 1 also says the stacked layers are held in stage order
        # (pipeline.LayerOrder), as the trainer's train state holds them
        self.pipeline_stages = 1
        self.pipeline_repeats = 1
        self.model = Backbone(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                              attention_impl=attention_impl, scan_layers=scan_layers)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, logical_axes=("embed", "vocab"),
                                  rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def layer_modules(self) -> list:
        """The layer module(s): one stacked module with ``scan_layers``, else N."""
        return [self.model.layers] if self.scan_layers else list(self.model.layers)

    def set_attention_impl(self, impl: str) -> None:
        for layer in self.layer_modules():
            layer.self_attn.attention_impl = impl

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        dtype = dtype or self.dtype
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    def forward(self, input_ids=None, *, positions=None, segment_ids=None, cache: KVCache | None = None,
                input_embeds=None, logits_at=None, head: bool = True) -> DecoderOutput:
        """Full forward. ``positions`` default to ``arange(T)``; ``segment_ids [B,T]`` (0 = pad)
        confine attention to each packed example; ``input_embeds`` replaces the embedding lookup
        (NEFTune adds noise there); ``logits_at [B, K]`` applies the output head only at those
        positions (logits ``[B, K, V]``: scoring needs a few positions, not all T).
        ``head=False``: no logits; ``hidden`` holds the final-normed hidden states instead, for
        :meth:`token_nll` (the training loss, which never holds all ``[B, T, V]`` logits).

        Micro-batched call (training with ``mesh.stage > 1``): ``input_ids [M, B, T]`` (or
        ``input_embeds [M, B, T, H]``) are M micro-batches run through the layers as a pipeline
        of ``pipeline_stages`` stages (models/pipeline.py); logits ``[M, B, T, V]`` and
        ``aux_loss`` the SUM of each micro-batch's router loss."""
        h_BTH = self.model.embed_tokens(input_ids) if input_embeds is None else input_embeds
        if h_BTH.ndim == 4:
            return self._pipelined(h_BTH, positions, segment_ids, head)
        B, T = h_BTH.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        inv_freq = rope_inv_freq(self.config)
        if self.scan_layers and self.pipeline_stages > 1 and (cache is None or isinstance(cache, KVCache)):
            return self._finish(*self._pipelined_rows(h_BTH, positions, inv_freq, segment_ids, cache),
                                logits_at, head)
        if self.scan_layers:
            return self._finish(*self._scan(h_BTH, positions, inv_freq, segment_ids, cache),
                                logits_at, head)
        router_stats = 0.0
        for i, layer in enumerate(self.model.layers):
            if self.remat != "none" and cache is None:
                h_BTH, stats = remat_layer(layer, self.remat, h_BTH, positions, inv_freq, segment_ids)
            else:
                kv = None if cache is None else cache.layer(i)
                h_BTH, kv, stats = layer(h_BTH, positions, inv_freq, segment_ids, kv)
                cache = None if cache is None else cache.update(i, kv)
            router_stats = router_stats + stats
        return self._finish(h_BTH, cache, router_stats, logits_at, head)

    def _scan(self, h_BTH, positions, inv_freq, segment_ids, cache):
        policy = None if self.remat == "none" else remat_policy(self.remat)
        remat = self.remat != "none" and cache is None
        kv = None if cache is None else (cache.k, cache.v)
        h_BTH, kv, router_stats = scan_layers(
            self.model.layers, h_BTH, positions, inv_freq, segment_ids, kv, remat=remat,
            policy=policy, dtype=self.dtype)
        return h_BTH, (None if cache is None else KVCache(k=kv[0], v=kv[1])), router_stats

    def _pipelined(self, h_MBTH, positions, segment_ids, head=True) -> DecoderOutput:
        """M micro-batches through the pipelined layers; embedding and head run outside the
        pipeline on every stage (docs/SCALE.md#pipeline-parallelism-meshstage)."""
        if not self.scan_layers:
            raise ValueError("a micro-batched (pipelined) forward needs scan_layers=True")
        M, B, T = h_MBTH.shape[:3]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (M, B, T))
        policy = None if self.remat == "none" else remat_policy(self.remat)
        h_MBTH, _, stats_M = pipeline_layers(
            self.model.layers, h_MBTH, positions, rope_inv_freq(self.config), segment_ids,
            stages=self.pipeline_stages, repeats=self.pipeline_repeats,
            remat=self.remat != "none", policy=policy)
        # the head on [M, B, T, H] as is: merging M into the row axis would lose the rows'
        # split over the batch axes (GSPMD gathers every row onto every device)
        out = self._finish(h_MBTH, None, None, None, head)
        aux_loss = (jnp.sum(jax.vmap(load_balancing_loss, in_axes=(0, None))(
            stats_M, self.config.num_experts)) if self.config.is_moe else jnp.zeros((), jnp.float32))
        return out._replace(aux_loss=aux_loss)

    def _pipelined_rows(self, h_BTH, positions, inv_freq, segment_ids, cache):
        """An inference forward (``[B, T]`` rows; scoring, generation, held-out loss) of a model
        whose layers are split over ``pipeline_stages`` stages: the rows run through the
        pipeline as ``M = S`` strided micro-batches (rows ``m::M``, as training splits a batch;
        one micro-batch when ``S`` does not divide ``B``, e.g. one prompt) in the schedule of the
        order the layers are held in (``pipeline_repeats``: 1, GPipe, for a model handed out by
        the trainer; the run's ``R`` for its held-out evaluation on the train state, held in
        stage order), the KV cache split over the stages with its layers. No device gathers
        another stage's weights. Returns what :meth:`_scan` returns."""
        S, B = self.pipeline_stages, h_BTH.shape[0]
        M = S if B % S == 0 else 1
        split = lambda x: None if x is None else jnp.swapaxes(        # noqa: E731  [B, ...] → [M, B/M, ...]
            x.reshape(B // M, M, *x.shape[1:]), 0, 1)
        merge = lambda x: jnp.swapaxes(x, 0, 1).reshape(B, *x.shape[2:])   # noqa: E731
        kv = None if cache is None else tuple(
            jnp.swapaxes(c.reshape(c.shape[0], B // M, M, *c.shape[2:]), 1, 2) for c in (cache.k, cache.v))
        policy = None if self.remat == "none" else remat_policy(self.remat)
        h_MBTH, kv, stats_M = pipeline_layers(
            self.model.layers, split(h_BTH), split(positions), inv_freq, split(segment_ids),
            stages=S, repeats=self.pipeline_repeats, remat=self.remat != "none" and cache is None,
            policy=policy, kv=kv)
        if kv is not None:
            k, v = (jnp.swapaxes(c, 1, 2).reshape(c.shape[0], B, *c.shape[3:]) for c in kv)
            cache = KVCache(k=k, v=v)
        return merge(h_MBTH), cache, jnp.sum(stats_M, axis=0)

    def _finish(self, h_BTH, new_cache, router_stats, logits_at, head=True) -> DecoderOutput:
        if logits_at is not None:
            h_BTH = jnp.take_along_axis(h_BTH, logits_at[..., None].astype(jnp.int32), axis=1)
        h_BTH = self.model.norm(h_BTH)
        aux_loss = (load_balancing_loss(router_stats, self.config.num_experts)
                    if self.config.is_moe and router_stats is not None else jnp.zeros((), jnp.float32))
        if not head:
            return DecoderOutput(None, new_cache, aux_loss, h_BTH)
        return DecoderOutput(self.head(h_BTH), new_cache, aux_loss)

    def head(self, h_BTH):
        """The output head on final-normed hidden states ``[..., H]``: fp32 logits ``[..., V]``."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(h_BTH).astype(jnp.float32)
        return self.lm_head(h_BTH).astype(jnp.float32)

    def token_nll(self, h_BTH, targets_BT, chunk: int | None = None):
        """Per-token NLL ``[..., T]`` (fp32) of the head on ``forward(head=False).hidden``
        (``[..., T, H]``, any leading dims: ``[M, B, T, H]`` micro-batches keep their split),
        ``chunk`` tokens of every row at a time (default :func:`loss_chunk`): a ``lax.scan`` over
        the chunks, each under ``jax.checkpoint``, so one chunk's ``[..., chunk, V]`` fp32 logits
        exist at a time, in the forward and again (recomputed) in the backward, and the head's
        weight gradient is summed chunk by chunk inside the loop. The same sums as
        ``logits_nll(head(h), targets)`` in another order; one chunk is exactly that."""
        T, H = h_BTH.shape[-2:]
        chunk = chunk or loss_chunk(T, self.config.vocab_size)
        if chunk >= T:
            return logits_nll(self.head(h_BTH), targets_BT)
        n = -(-T // chunk)
        pad = [(0, 0)] * (targets_BT.ndim - 1) + [(0, n * chunk - T)]
        lead = targets_BT.shape[:-1]
        h_NBCH = jnp.moveaxis(jnp.pad(h_BTH, pad + [(0, 0)]).reshape(*lead, n, chunk, H), -3, 0)
        t_NBC = jnp.moveaxis(jnp.pad(targets_BT, pad).reshape(*lead, n, chunk), -2, 0)
        one_chunk = jax.checkpoint(lambda h, t: logits_nll(self.head(h), t))
        _, nll_NBC = jax.lax.scan(lambda c, x: (c, one_chunk(*x)), None, (h_NBCH, t_NBC))
        return jnp.moveaxis(nll_NBC, 0, -2).reshape(*lead, n * chunk)[..., :T]

    def __call__(self, input_ids, *, positions=None, segment_ids=None):
        return self.forward(input_ids, positions=positions, segment_ids=segment_ids).logits


def init_decoder(cfg: ModelConfig, *, seed: int = 0, **kwargs) -> Decoder:
    return Decoder(cfg, rngs=nnx.Rngs(seed), **kwargs)


def abstract_decoder(cfg: ModelConfig, **kwargs) -> Decoder:
    """Shape-only decoder (no memory): ``nnx.eval_shape``."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), **kwargs))
