"""medjax: a JAX/Flax-native stack for medical LLMs.

    model, tokenizer = medjax.load("path/to/hf_dir_or.gguf")     # or a training run's directory
    logits = model(jnp.asarray([tokenizer.encode("Aspirin inhibits")]))
    medjax.save_hf(model, "out_dir", tokenizer=tokenizer)
    medjax.save_gguf(model, "model.gguf", tokenizer=tokenizer, type="q8_0")

The names are imported on first use, so ``import medjax.errors`` (and every CLI's ``--help``)
does not start jax; the imports are spelled out so tests/test_import_graph.py sees them.
"""
__all__ = ["load", "save_hf", "save_gguf", "Decoder", "ModelConfig"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "load":
        from medjax.loading import load as value
    elif name == "save_hf":
        from medjax.hf.export import save_hf as value
    elif name == "save_gguf":
        from medjax.hf.gguf_export import save_gguf as value
    elif name == "Decoder":
        from medjax.models import Decoder as value
    elif name == "ModelConfig":
        from medjax.models import ModelConfig as value
    else:
        raise AttributeError(f"module 'medjax' has no attribute {name!r}")
    globals()[name] = value
    return value
