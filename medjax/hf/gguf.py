"""GGUF import (llama-architecture files: Llama, Mistral, Mixtral as llama.cpp writes them).

Tensors are dequantized with the ``gguf`` package (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K, ...),
llama.cpp's interleaved q/k row permutation is undone, and the tokenizer is rebuilt from the
file's metadata. ``gguf`` is imported lazily: the GPU image does not ship it.
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from medjax.hf.safetensors_io import CheckpointError
from medjax.models import ModelConfig, UnsupportedModelError, abstract_decoder

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


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (only 'llama': "
                                    f"Llama, Mistral and Mixtral as llama.cpp writes them)")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_heads = g("attention.head_count")
    experts = g("expert_count", 0) or 0
    return ModelConfig(
        architecture="mixtral" if experts else "llama",
        vocab_size=int(g("vocab_size") or embd.shape[-1]),
        hidden_size=g("embedding_length"),
        intermediate_size=g("feed_forward_length"),
        num_layers=g("block_count"),
        num_heads=n_heads,
        num_kv_heads=g("attention.head_count_kv", n_heads),
        head_dim=g("rope.dimension_count") or g("embedding_length") // n_heads,
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        max_position_embeddings=g("context_length", 4096),
        tie_word_embeddings="output.weight" not in names,
        num_experts=experts,
        num_experts_per_tok=g("expert_used_count", 2) if experts else 2,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


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


def load_gguf(path, *, dtype=jnp.float32, param_dtype=None, attention_impl="auto"):
    import gguf
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises assorted errors on corrupt files
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    cfg = gguf_config(reader)
    model = abstract_decoder(cfg, dtype=dtype, param_dtype=param_dtype or dtype,
                             attention_impl=attention_impl)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    by_path = dict(flat)
    filled = set()
    for t in reader.tensors:
        if t.name in _GLOBAL:
            mpath, transpose = _GLOBAL[t.name]
        else:
            parts = t.name.split(".", 2)
            if parts[0] != "blk" or parts[2] not in _BLOCK:
                if t.name == "rope_freqs.weight":
                    raise UnsupportedModelError(f"{path}: rope_freqs (llama3 rope scaling in GGUF) "
                                                f"is not supported yet")
                raise CheckpointError(f"{path}: unexpected tensor {t.name!r}")
            suffix, transpose = _BLOCK[parts[2]]
            mpath = ("model", "layers", int(parts[1])) + suffix
        if mpath not in by_path:
            raise CheckpointError(f"{path}: tensor {t.name!r} has no place in the model (config mismatch)")
        w = _dequantize(t)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _unpermute(w, cfg.num_heads if "attn_q" in t.name else cfg.num_kv_heads)
        if transpose:
            w = np.swapaxes(w, -1, -2)
        var = by_path[mpath]
        want = tuple(var.get_value().shape)
        if w.shape != want:
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {list(w.shape)}, expected {list(want)}")
        var.set_value(jnp.asarray(w.astype(np.dtype(var.get_value().dtype))))
        filled.add(mpath)
    missing = [".".join(map(str, p)) for p in by_path if p not in filled]
    if missing:
        raise CheckpointError(f"{path}: missing tensor for {missing[0]}")
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.source_path = str(path.resolve())
    from medjax.tokenizer import Tokenizer
    try:
        tokenizer = Tokenizer.from_gguf(reader)
    except (ValueError, NotImplementedError) as e:
        import warnings
        warnings.warn(f"{path}: tokenizer not built from GGUF metadata: {e}")
        tokenizer = None
    return model, tokenizer
