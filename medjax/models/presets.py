"""Named model presets: the published full-size shapes and tiny CPU-sized variants of each family."""
from __future__ import annotations

import dataclasses

from medjax.models.config import ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5,
                             max_position_embeddings=4096),
    "llama2-70b": ModelConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8, rms_norm_eps=1e-5,
                              max_position_embeddings=4096),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                             rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
                             bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "llama3-70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8, rope_theta=500000.0,
                              rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
                              bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "mistral-7b": ModelConfig(architecture="mistral", vocab_size=32000, hidden_size=4096,
                              intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                              max_position_embeddings=32768, sliding_window=4096),
    "mixtral-8x7b": ModelConfig(architecture="mixtral", vocab_size=32000, hidden_size=4096,
                                intermediate_size=14336, num_layers=32, num_heads=32,
                                num_kv_heads=8, rope_theta=1e6, max_position_embeddings=32768,
                                num_experts=8, num_experts_per_tok=2),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0,
                                tie_word_embeddings=True, max_position_embeddings=8192),
}

# Tiny variants: same family features (GQA, llama3 rope, sliding window, MoE), CPU-sized.
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
             num_kv_heads=2, max_position_embeddings=512)
PRESETS.update({
    "tiny-llama2": ModelConfig(**_TINY),
    "tiny-llama3": ModelConfig(**_TINY, rope_theta=500000.0,
                               rope_scaling={**_LLAMA3_ROPE, "original_max_position_embeddings": 64}),
    "tiny-mistral": ModelConfig(architecture="mistral", **_TINY, sliding_window=8),
    "tiny-mixtral": ModelConfig(architecture="mixtral", **_TINY, num_experts=4, num_experts_per_tok=2),
})
PRESETS["tiny-llama"] = PRESETS["tiny-llama2"]
# 8 layers: enough to cut into pipeline stages x repeats (mesh.stage=4, train.pipeline_repeats=2)
PRESETS["tiny-llama2-8l"] = dataclasses.replace(PRESETS["tiny-llama2"], num_layers=8)
PRESETS["tiny-mixtral-8l"] = dataclasses.replace(PRESETS["tiny-mixtral"], num_layers=8)

# Published parameter counts (model cards / HF safetensors index totals).
PUBLISHED_PARAMS = {
    "llama2-7b": 6_738_415_616,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "smollm2-135m": 134_515_008,
}


def get(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        import difflib
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown model preset {name!r}{hint}; known: {sorted(PRESETS)}") from None
