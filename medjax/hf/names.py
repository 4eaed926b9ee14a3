"""The HF ↔ medjax name table, with each transpose explicit.

medjax param paths mirror HF names; ``Linear.kernel`` is HF ``weight`` transposed, experts are
stacked ``[E, in, out]``. Mixtral experts are read in either on-disk form
(``block_sparse_moe.experts.{e}.w1|w2|w3``) or transformers-5 fused form
(``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from medjax.models.config import ModelConfig

Path_ = tuple  # a medjax param path, e.g. ("model", "layers", 0, "self_attn", "q_proj", "kernel")


def _t(w):
    return np.ascontiguousarray(w.T)


def _t_last2(w):
    return np.ascontiguousarray(np.swapaxes(w, -1, -2))


# The explicit list of transforms. "copy" and "t" are row-sliceable (sharded import reads only
# the rows a device needs); the fused-expert ones read the whole tensor.
TRANSFORMS: dict[str, Callable] = {
    "copy": lambda w: w,
    "t": _t,                                         # Linear: HF [out, in] -> kernel [in, out]
    "t_last2": _t_last2,                             # fused down_proj [E, H, I] -> [E, I, H]
}


@dataclass(frozen=True)
class Part:
    hf_name: str
    transform: str            # key of TRANSFORMS, or "gate_half"/"up_half" (fused gate_up_proj)
    expert: int | None = None  # None: the whole param; e: param[e] of a stacked expert tensor


@dataclass(frozen=True)
class Source:
    """How one medjax param is assembled from HF tensors."""
    parts: tuple


def _linear(hf_prefix):
    return Source((Part(f"{hf_prefix}.weight", "t"),))


def _copy(hf_name):
    return Source((Part(hf_name, "copy"),))


def apply_transform(part: Part, w: np.ndarray, intermediate: int) -> np.ndarray:
    if part.transform == "gate_half":
        return _t_last2(w[:, :intermediate])
    if part.transform == "up_half":
        return _t_last2(w[:, intermediate:])
    return TRANSFORMS[part.transform](w)


def param_sources(cfg: ModelConfig, available: set[str] | None = None) -> dict[Path_, Source]:
    """medjax param path → Source. ``available`` (HF names present) picks the Mixtral expert form."""
    out: dict[Path_, Source] = {
        ("model", "embed_tokens", "embedding"): _copy("model.embed_tokens.weight"),
        ("model", "norm", "weight"): _copy("model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        out[("lm_head", "kernel")] = _linear("lm_head")
    fused = available is not None and any(".mlp.experts.gate_up_proj" in n for n in available)
    for i in range(cfg.num_layers):
        hp, mp = f"model.layers.{i}", ("model", "layers", i)
        out[mp + ("input_layernorm", "weight")] = _copy(f"{hp}.input_layernorm.weight")
        out[mp + ("post_attention_layernorm", "weight")] = _copy(f"{hp}.post_attention_layernorm.weight")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[mp + ("self_attn", p, "kernel")] = _linear(f"{hp}.self_attn.{p}")
        if not cfg.is_moe:
            for p in ("gate_proj", "up_proj", "down_proj"):
                out[mp + ("mlp", p, "kernel")] = _linear(f"{hp}.mlp.{p}")
            continue
        moe = mp + ("block_sparse_moe",)
        if fused:
            out[moe + ("gate", "kernel")] = _linear(f"{hp}.mlp.gate")
            gu = f"{hp}.mlp.experts.gate_up_proj"
            out[moe + ("experts", "gate_proj")] = Source((Part(gu, "gate_half"),))
            out[moe + ("experts", "up_proj")] = Source((Part(gu, "up_half"),))
            out[moe + ("experts", "down_proj")] = Source((Part(f"{hp}.mlp.experts.down_proj", "t_last2"),))
        else:
            out[moe + ("gate", "kernel")] = _linear(f"{hp}.block_sparse_moe.gate")
            for ours, theirs in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                out[moe + ("experts", ours)] = Source(tuple(
                    Part(f"{hp}.block_sparse_moe.experts.{e}.{theirs}.weight", "t", e)
                    for e in range(cfg.num_experts)))
    return out


def export_tensors(cfg: ModelConfig, get: Callable[..., np.ndarray]):
    """Yield ``(hf_name, array)`` in HF's on-disk layout (per-expert w1/w2/w3 for Mixtral).
    ``get(path, index=())`` reads ``param[index]``: one expert is read on its own, so the host
    holds one ``[in, out]`` matrix, not its layer's whole expert stack (0.94 GB at Mixtral
    width, held twice while it was copied off the device)."""
    for path, src in param_sources(cfg).items():
        for part in src.parts:
            assert part.transform in ("copy", "t"), part  # export always writes the on-disk form
            block = get(path) if part.expert is None else get(path, (part.expert,))
            yield part.hf_name, TRANSFORMS[part.transform](block)


def export_shapes(cfg: ModelConfig, shape_of: Callable[[Path_], tuple]):
    """Yield ``(hf_name, shape)`` of what ``export_tensors`` yields, in its order, from the params'
    shapes alone (a safetensors header is written before any tensor is made)."""
    for path, src in param_sources(cfg).items():
        shape = tuple(shape_of(path))
        for part in src.parts:
            block = shape if part.expert is None else shape[1:]
            yield part.hf_name, block[::-1] if part.transform == "t" else block


# Tensors some checkpoints carry that are derived buffers, not parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
