"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings during training only.

Each embedding vector of a real token gets ``uniform(-1, 1) * alpha / sqrt(L * d)`` added, where
``d`` is the hidden size and ``L`` the unpadded length of the example the token belongs to. In a
packed row every segment (``segment_ids`` value > 0) is its own example with its own ``L``;
padding (segment 0) gets no noise. Internist.ai trained with ``alpha = 5``.

Wiring: :func:`attach_neftune` hangs a parameter-free :class:`NEFTune` module (its alpha and an
``nnx`` RNG stream) on the decoder as ``model.neftune``; the training step asks
:func:`noisy_embeddings` for the embeddings to feed ``decoder.forward(input_embeds=...)``. The RNG
state travels with the train state (``nnx.RngState``), so noise is reproducible and resumable.
Evaluation never adds noise: eval paths call the decoder without asking for noisy embeddings,
and ``nnx.view(model, deterministic=True)`` switches the module off as well.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class NEFTune(nnx.Module):
    def __init__(self, alpha: float, *, seed: int = 0):
        if alpha < 0:
            raise ValueError(f"NEFTune alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.deterministic = False
        self.rngs = nnx.Rngs(neftune=seed)["neftune"].fork()

    def set_view(self, deterministic: bool | None = None):
        if deterministic is not None:
            self.deterministic = deterministic


def attach_neftune(model, alpha: float, *, seed: int = 0):
    """Enable NEFTune on ``model`` (no-op for ``alpha == 0``); returns the model."""
    if alpha:
        model.neftune = NEFTune(alpha, seed=seed)
    return model


def example_lengths(segment_ids_BT):
    """Per token: the number of tokens of its segment in its row (0 on padding)."""
    B, T = segment_ids_BT.shape
    counts_BS = jax.vmap(lambda s: jnp.bincount(s, length=T + 1))(segment_ids_BT)
    lengths_BT = jnp.take_along_axis(counts_BS, segment_ids_BT, axis=1)
    return jnp.where(segment_ids_BT > 0, lengths_BT, 0)


def neftune_noise(key, shape_BTD, segment_ids_BT, alpha: float):
    """``uniform(-1, 1) * alpha / sqrt(L * d)`` per token (fp32), zero on padding."""
    B, T, D = shape_BTD
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    lengths_BT = example_lengths(segment_ids_BT).astype(jnp.float32)
    scale_BT = jnp.where(lengths_BT > 0, alpha / jnp.sqrt(jnp.maximum(lengths_BT, 1.0) * D), 0.0)
    return jax.random.uniform(key, (B, T, D), jnp.float32, -1.0, 1.0) * scale_BT[..., None]


def noisy_embeddings(model, batch):
    """Embeddings with NEFTune noise for a training forward, or ``None`` (use the plain lookup)
    when NEFTune is not attached, has alpha 0 or is switched off (eval view)."""
    neftune = getattr(model, "neftune", None)
    if neftune is None or neftune.deterministic or not neftune.alpha:
        return None
    embeds = model.model.embed_tokens(batch["input_ids"])
    segment_ids = batch.get("segment_ids")
    if embeds.ndim == 4:     # [M, B, T, D] micro-batches (pipeline): one draw each, in order
        noise = jnp.stack([neftune_noise(neftune.rngs(), embeds.shape[1:],
                                         None if segment_ids is None else segment_ids[i],
                                         neftune.alpha) for i in range(embeds.shape[0])])
    else:
        noise = neftune_noise(neftune.rngs(), embeds.shape, segment_ids, neftune.alpha)
    return (embeds.astype(jnp.float32) + noise).astype(embeds.dtype)
