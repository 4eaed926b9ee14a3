"""medjax: a JAX/Flax-native stack for medical LLMs.

    model, tokenizer = medjax.load("path/to/hf_dir_or.gguf")
    logits = model(jnp.asarray([tokenizer.encode("Aspirin inhibits")]))
    medjax.save_hf(model, "out_dir", tokenizer=tokenizer)
    medjax.save_gguf(model, "model.gguf", tokenizer=tokenizer, type="q8_0")
"""
from medjax.hf.export import save_hf
from medjax.hf.gguf_export import save_gguf
from medjax.loading import load
from medjax.models import Decoder, ModelConfig

__all__ = ["load", "save_hf", "save_gguf", "Decoder", "ModelConfig"]
__version__ = "0.1.0"
