"""medjax: a JAX/Flax-native stack for medical LLMs.

    model, tokenizer = medjax.load("path/to/hf_dir_or.gguf")
    logits = model(jnp.asarray([tokenizer.encode("Aspirin inhibits")]))
    medjax.save_hf(model, "out_dir", tokenizer=tokenizer)
"""
from medjax.hf.export import save_hf
from medjax.loading import load
from medjax.models import Decoder, ModelConfig

__all__ = ["load", "save_hf", "Decoder", "ModelConfig"]
__version__ = "0.1.0"
