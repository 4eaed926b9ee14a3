"""GGUF export: ``save_gguf(model, path, tokenizer=, type=)`` writes a file llama.cpp and
``transformers`` load (architecture ``llama``: Llama-2/3, Mistral and Mixtral).

* Tensor names are the import's table (``medjax.hf.gguf``) read backwards and checked against
  the ``gguf`` package's tensor-name map for ``MODEL_ARCH.LLAMA``. Weights are stored as
  llama.cpp stores them: ``[out, in]`` rows, attn_q/attn_k rows permuted into llama.cpp's
  interleaved RoPE order, Mixtral experts stacked (``ffn_*_exps``).
* ``type`` (f32, f16, q8_0, q4_0, q4_1) applies to every matrix; 1-D tensors (norms,
  ``rope_freqs``) and the MoE router stay f32, as llama.cpp's converter keeps them. Quantization
  is ``gguf.quants.quantize`` (bit-exact with ggml's reference quantizers).
* Metadata: the ``gguf.Keys`` llama.cpp reads for the architecture (sizes, rope base/dimension,
  linear rope scaling, sliding window, expert counts) and the tokenizer
  (``medjax.hf.gguf_vocab``). Llama-3 rope scaling is the ``rope_freqs`` tensor: one factor per
  frequency by which llama.cpp divides it (the importer recovers the rope_scaling from it).
* The file is streamed tensor by tensor into a temporary sibling and renamed into place, so a
  crash never leaves a partial file under the final name.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from medjax.hf.gguf import _BLOCK, _GLOBAL
from medjax.errors import CheckpointError
from medjax.models.stack import per_layer_flat, value_shape
from medjax.outputs import temp_file_beside
from medjax.sharding import host_value

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # gguf.LlamaFileType values
_KEEP_F32 = ("ffn_gate_inp.weight",)  # the router: llama.cpp never quantizes it


def permute_qk(w_OI: np.ndarray, n_heads: int) -> np.ndarray:
    """HF q/k rows (rotate-half pairs i, i+D/2) → llama.cpp's interleaved pairs (2i, 2i+1)."""
    head_dim = w_OI.shape[0] // n_heads
    return w_OI.reshape(n_heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(w_OI.shape)


def rope_freq_factors(cfg) -> np.ndarray | None:
    """``rope_freqs`` for llama3 scaling: unscaled inverse frequency / scaled one, per frequency."""
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type", sc.get("type")) != "llama3":
        return None
    from medjax.models.layers import rope_inv_freq
    plain = np.asarray(rope_inv_freq(cfg.replace(rope_scaling=None)), np.float64)
    return (plain / np.asarray(rope_inv_freq(cfg), np.float64)).astype(np.float32)


def _tensor_plan(cfg, flat) -> list[tuple[str, tuple, bool]]:
    """``(gguf name, medjax path, transposed)`` for every tensor the model has."""
    plan = [(name, path, t) for name, (path, t) in _GLOBAL.items() if path in flat]
    for i in range(cfg.num_layers):
        for suffix, (path, t) in _BLOCK.items():
            full = ("model", "layers", i) + path
            if full in flat:
                plan.append((f"blk.{i}.{suffix}", full, t))
    names = {n for n, _, _ in plan}
    assert len(names) == len(plan) and len(plan) == len(flat), (sorted(names), list(flat))
    return plan


def _check_names(names) -> None:
    """Every tensor name is one the ``gguf`` package lists for MODEL_ARCH.LLAMA."""
    import gguf
    allowed = set()
    for kind in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]:
        allowed.add(gguf.TENSOR_NAMES[kind].split(".{bid}.")[-1])
    for name in names:
        stem = name.rsplit(".", 1)[0].split(".")[-1]
        assert stem in allowed, f"{name} is not a llama tensor in gguf's name map"


def _store_type(name: str, shape: tuple, type: str):
    import gguf
    if len(shape) == 1 or name.endswith(_KEEP_F32):
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[type.upper()]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise CheckpointError(f"tensor {name!r} with shape {list(shape)} cannot be stored as {type}: "
                              f"its rows have {shape[-1]} values, not a multiple of the {type} block "
                              f"size {block} (choose f32, f16 or another type)")
    return qtype


def _as_stored(w: np.ndarray, qtype) -> np.ndarray:
    import gguf
    w = np.ascontiguousarray(w, np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return w
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w, qtype)


def _put(writer, key: str, value) -> None:
    """One metadata value with the GGUF type llama.cpp reads it as."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        writer.add_uint32(key, int(value))
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def model_metadata(cfg, type: str) -> dict:
    """``{gguf key: value}`` for the architecture (``gguf.Keys`` formatted for ``llama``)."""
    import gguf
    K = gguf.Keys
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    meta = {
        K.General.FILE_TYPE: _FILE_TYPES[type],
        K.LLM.VOCAB_SIZE: cfg.vocab_size,
        K.LLM.CONTEXT_LENGTH: cfg.max_position_embeddings,
        K.LLM.EMBEDDING_LENGTH: cfg.hidden_size,
        K.LLM.BLOCK_COUNT: cfg.num_layers,
        K.LLM.FEED_FORWARD_LENGTH: cfg.intermediate_size,
        K.Attention.HEAD_COUNT: cfg.num_heads,
        K.Attention.HEAD_COUNT_KV: cfg.num_kv_heads,
        K.Attention.LAYERNORM_RMS_EPS: float(cfg.rms_norm_eps),
        K.Rope.DIMENSION_COUNT: cfg.head_dim,
        K.Rope.FREQ_BASE: float(cfg.rope_theta),
    }
    if type.startswith("q"):
        meta[K.General.QUANTIZATION_VERSION] = gguf.GGML_QUANT_VERSION
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        meta[K.Attention.KEY_LENGTH] = meta[K.Attention.VALUE_LENGTH] = cfg.head_dim
    if cfg.sliding_window:
        meta[K.Attention.SLIDING_WINDOW] = cfg.sliding_window
    if cfg.is_moe:
        meta[K.LLM.EXPERT_COUNT] = cfg.num_experts
        meta[K.LLM.EXPERT_USED_COUNT] = cfg.num_experts_per_tok
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        meta[K.Rope.SCALING_TYPE] = gguf.RopeScalingType.LINEAR.value
        meta[K.Rope.SCALING_FACTOR] = float(sc["factor"])
    return {k.format(arch=arch): v for k, v in meta.items()}


def save_gguf(model, path, *, tokenizer=None, type: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (+ ``tokenizer``'s vocabulary and chat template) as a GGUF file at ``path``."""
    import gguf
    if type not in TYPES:
        raise CheckpointError(f"GGUF type {type!r} is not one of {', '.join(TYPES)}")
    out = Path(path).resolve()
    source = getattr(model, "source_path", None)
    if source is not None and Path(source).resolve() == out:
        raise CheckpointError(f"refusing to export over {out}: the model was loaded from there")
    cfg = model.config
    flat = per_layer_flat(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    plan = _tensor_plan(cfg, flat)
    factors = rope_freq_factors(cfg)
    shapes = {}
    for tname, mpath, transposed in plan:
        shape = value_shape(flat[mpath])
        shapes[tname] = shape[:-2] + shape[:-3:-1] if transposed else shape
    if factors is not None:
        shapes["rope_freqs.weight"] = factors.shape
    _check_names(shapes)
    qtypes = {n: _store_type(n, s, type) for n, s in shapes.items()}  # all shape errors before writing

    meta = model_metadata(cfg, type)
    meta[gguf.Keys.General.NAME] = name or (Path(source).stem if source else "medjax")
    if tokenizer is not None:
        from medjax.hf.gguf_vocab import tokenizer_metadata
        meta.update(tokenizer_metadata(tokenizer, cfg.vocab_size))
    else:  # no vocabulary: keep at least the model's special ids
        for key, value in ((gguf.Keys.Tokenizer.BOS_ID, cfg.bos_token_id), (gguf.Keys.Tokenizer.EOS_ID, cfg.eos_token_id),
                           (gguf.Keys.Tokenizer.PAD_ID, cfg.pad_token_id)):
            value = value[0] if isinstance(value, list) else value
            if value is not None:
                meta[key] = int(value)

    if jax.process_index() != 0:  # gathering a sharded weight is collective: every process takes part
        for _, mpath, _ in plan:
            host_value(flat[mpath].get_value())
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by an export that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = temp_file_beside(out)                             # the umask's mode, not mkstemp's 0600
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        for key, value in meta.items():
            _put(writer, key, value)
        for tname, shape in shapes.items():
            qtype = qtypes[tname]
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(tname, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                       raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tname, mpath, transposed in plan:
            w = np.asarray(host_value(flat[mpath].get_value()), np.float32)
            if transposed:
                w = np.swapaxes(w, -1, -2)
            if tname.endswith("attn_q.weight"):
                w = permute_qk(w, cfg.num_heads)
            elif tname.endswith("attn_k.weight"):
                w = permute_qk(w, cfg.num_kv_heads)
            writer.write_tensor_data(_as_stored(w, qtypes[tname]))
        if factors is not None:
            writer.write_tensor_data(factors)
        writer.close()
        os.replace(tmp, out)
        tmp = None
    finally:
        writer.close()
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return out
