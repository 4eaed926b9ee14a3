"""GGUF import (llama-architecture files: Llama, Mistral, Mixtral as llama.cpp writes them).

Tensors are dequantized with the ``gguf`` package (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K, ...),
llama.cpp's interleaved q/k row permutation is undone, and the tokenizer is rebuilt from the
file's metadata. ``gguf`` is imported lazily: the GPU image does not ship it.

Rope scaling: ``rope.scaling.type = linear`` becomes a linear rope_scaling; llama3 scaling is
stored only as the ``rope_freqs`` tensor (the factor dividing each frequency), from which
``llama3_scaling`` recovers an equivalent rope_scaling and checks it reproduces every factor.
``attention.sliding_window`` makes a dense model ``mistral`` (Mixtral keeps it too).
"""
from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from medjax.errors import CheckpointError
from medjax.models import ModelConfig, abstract_decoder

# GGUF name (per block where it has {i}) -> (medjax path suffix, transposed?)
_GLOBAL = {
    "token_embd.weight": (("model", "embed_tokens", "embedding"), False),
    "output_norm.weight": (("model", "norm", "weight"), False),
    "output.weight": (("lm_head", "kernel"), True),
}
_BLOCK = {
    "attn_norm.weight": (("input_layernorm", "weight"), False),
    "ffn_norm.weight": (("post_attention_layernorm", "weight"), False),
    "attn_q.weight": (("self_attn", "q_proj", "kernel"), True),
    "attn_k.weight": (("self_attn", "k_proj", "kernel"), True),
    "attn_v.weight": (("self_attn", "v_proj", "kernel"), True),
    "attn_output.weight": (("self_attn", "o_proj", "kernel"), True),
    "ffn_gate.weight": (("mlp", "gate_proj", "kernel"), True),
    "ffn_up.weight": (("mlp", "up_proj", "kernel"), True),
    "ffn_down.weight": (("mlp", "down_proj", "kernel"), True),
    "ffn_gate_inp.weight": (("block_sparse_moe", "gate", "kernel"), True),
    "ffn_gate_exps.weight": (("block_sparse_moe", "experts", "gate_proj"), True),
    "ffn_up_exps.weight": (("block_sparse_moe", "experts", "up_proj"), True),
    "ffn_down_exps.weight": (("block_sparse_moe", "experts", "down_proj"), True),
}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 → 1e-05)."""
    return float(str(np.float32(value)))


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama': "
                                    f"Llama, Mistral and Mixtral as llama.cpp writes them)")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_heads = g("attention.head_count")
    experts = g("expert_count", 0) or 0
    window = g("attention.sliding_window") or None
    head_dim = g("attention.key_length") or g("rope.dimension_count") or g("embedding_length") // n_heads
    theta = _f32(g("rope.freq_base", 10000.0))
    scaling = None
    if g("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    elif g("rope.scaling.type") not in (None, "none"):
        raise CheckpointError(f"GGUF rope scaling {g('rope.scaling.type')!r} is not supported "
                                    f"(supported: linear, and llama3 via rope_freqs)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        scaling = llama3_scaling(_dequantize(freqs).reshape(-1), theta, head_dim,
                                 g("context_length", 4096))
    return ModelConfig(
        architecture="mixtral" if experts else ("mistral" if window else "llama"),
        sliding_window=window,
        rope_scaling=scaling,
        vocab_size=int(g("vocab_size") or embd.shape[-1]),
        hidden_size=g("embedding_length"),
        intermediate_size=g("feed_forward_length"),
        num_layers=g("block_count"),
        num_heads=n_heads,
        num_kv_heads=g("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        rms_norm_eps=_f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        max_position_embeddings=g("context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        num_experts=experts,
        num_experts_per_tok=g("expert_used_count", 2) if experts else 2,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, context_length: int) -> dict:
    """A llama3 ``rope_scaling`` whose frequencies are ``plain / factors`` (llama.cpp's rope_freqs).

    Llama-3 scaling keeps high frequencies (factor 1), divides low ones by ``factor`` and blends in
    between with a weight linear in the frequency; only that line is fixed by the factors, so
    low_freq_factor is taken as 1 (every Llama-3.x release) and the rest solved from it.
    """
    from medjax.models.layers import rope_inv_freq
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = np.asarray(factors, np.float64)
    if factors.shape != inv.shape:
        raise CheckpointError(f"rope_freqs has {factors.size} factors, expected {inv.size} (head_dim/2)")
    factor = float(factors.max())
    wavelen = 2 * math.pi / inv
    middle = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if middle.sum() >= 2:  # 1/f = (1 - s)/factor + s, with s = orig/(wavelen (hi - lo)) - lo/(hi - lo)
        s = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[middle], s, 1)
        hi = 1 - 1 / b if b < 0 else 4.0
        orig = a * (hi - 1)
    else:  # a step: any boundary between the last kept and the first scaled wavelength
        kept, scaled = wavelen[factors <= 1 + 1e-6], wavelen[factors >= factor * (1 - 1e-6)]
        orig = float(scaled.min()) * (1 - 1e-6) if scaled.size else context_length
        edge = float(kept.max()) if kept.size else orig / 4
        hi = max(orig / edge * (1 - 1e-6), 1 + 1e-6)  # kept wavelengths < orig / hi
    scaling = {"rope_type": "llama3", "factor": round(factor, 6), "low_freq_factor": 1.0,
               "high_freq_factor": float(hi), "original_max_position_embeddings": float(orig)}
    probe = ModelConfig(vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                        num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta,
                        rope_scaling=scaling)
    got = inv / np.asarray(rope_inv_freq(probe), np.float64)
    if not np.allclose(got, factors, rtol=1e-4):
        raise CheckpointError(f"rope_freqs {np.round(factors, 4).tolist()} is not a llama3 rope "
                                    f"scaling medjax can express")
    return scaling


def _unpermute(w_OI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (rows interleaved per head for its RoPE layout)."""
    head_dim = w_OI.shape[0] // n_heads
    return w_OI.reshape(n_heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w_OI.shape)


def _dequantize(tensor) -> np.ndarray:
    import gguf
    try:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"tensor {tensor.name!r}: quantization {tensor.tensor_type.name} "
                              f"cannot be dequantized by gguf ({e})") from None
    return np.asarray(w, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _host_weight(t, transpose: bool, cfg) -> np.ndarray:
    """Tensor ``t`` dequantized, un-permuted (q/k) and transposed to the medjax layout; the
    last one is kept, so the blocks of one tensor cost one dequantization."""
    if _LAST[0] is not t:
        _LAST[:] = [None, None]              # drop the previous tensor before making the next
        w = _dequantize(t)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute(w, cfg.num_heads if "attn_q" in t.name else cfg.num_kv_heads)
        _LAST[:] = [t, np.swapaxes(w, -1, -2) if transpose else w]
    return _LAST[1]


_LAST = [None, None]


def load_gguf(path, *, dtype=jnp.float32, param_dtype=None, attention_impl="auto", prepare=None,
              sharding_of=None, scan_layers=False):
    """``(model, tokenizer)`` from a GGUF file. With ``sharding_of`` / ``prepare`` (see
    ``hf/load.py``: ``medjax.load(..., mesh=, rules=, prepare=)``) each tensor is dequantized once
    per process and lands straight in its shardings, or is quantized for QLoRA as it lands."""
    import gguf

    from medjax.hf.fill import StreamingLoader
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises assorted errors on corrupt files
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    cfg = gguf_config(reader)
    places = {}
    for t in reader.tensors:
        if t.name in _GLOBAL:
            mpath, transpose = _GLOBAL[t.name]
        else:
            parts = t.name.split(".", 2)
            if t.name == "rope_freqs.weight":
                continue  # read by gguf_config as the rope scaling
            if parts[0] != "blk" or parts[2] not in _BLOCK:
                raise CheckpointError(f"{path}: unexpected tensor {t.name!r}")
            suffix, transpose = _BLOCK[parts[2]]
            mpath = ("model", "layers", int(parts[1])) + suffix
        places[mpath] = (t, transpose)
    expected = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(abstract_decoder(cfg), nnx.Param))}
    # (per-layer paths: the loop layout's; the loader maps them onto stacked layers)
    for mpath, (t, _) in places.items():
        if mpath not in expected:
            raise CheckpointError(f"{path}: tensor {t.name!r} has no place in the model (config mismatch)")
    missing = sorted(".".join(map(str, p)) for p in expected - set(places))
    if missing:
        raise CheckpointError(f"{path}: missing tensor for {missing[0]}")
    loader = StreamingLoader(cfg, list(places), dtype=dtype, param_dtype=param_dtype or dtype,
                             attention_impl=attention_impl, prepare=prepare,
                             sharding_of=sharding_of or (lambda p, v: None), scan_layers=scan_layers)
    for mpath, (t, transpose) in places.items():
        shape = tuple(int(d) for d in reversed(t.shape))
        shape = shape[:-2] + shape[:-3:-1] if transpose else shape
        if shape != loader.shape(mpath):
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {list(shape)}, "
                                  f"expected {list(loader.shape(mpath))}")
        loader.fill(mpath, lambda idx, dt, t=t, transpose=transpose: np.ascontiguousarray(
            _host_weight(t, transpose, cfg)[idx], dtype=dt))
    _LAST[:] = [None, None]
    model = loader.model
    model.source_path = str(path.resolve())
    from medjax.hf.gguf_vocab import read_tokenizer
    try:
        tokenizer = read_tokenizer(reader, source=str(path))
    except (ValueError, NotImplementedError) as e:
        import warnings
        warnings.warn(f"{path}: tokenizer not built from GGUF metadata: {e}")
        tokenizer = None
    return model, tokenizer
