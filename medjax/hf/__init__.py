"""Hugging Face interop: safetensors import (streaming, sharded), export, GGUF import."""
from medjax.hf.export import save_hf
from medjax.hf.load import load_hf_dir

__all__ = ["save_hf", "load_hf_dir"]
