"""One tokenizer interface over HF ``tokenizer.json``, sentencepiece ``tokenizer.model`` and GGUF.

Every source is turned into a ``tokenizers.Tokenizer`` (the Rust library HF uses), so encoding,
special-token splitting and offsets behave the same whatever the file was: ``core`` (the
interface), ``files`` (loading), ``sentencepiece`` (the ``tokenizer.model`` conversion); the GGUF
vocabulary is read and written by ``medjax.hf.gguf_vocab``.
"""
from medjax.chat_templates import BUILTIN_CHAT_TEMPLATES
from medjax.tokenizer.core import Tokenizer, byte_tokenizer, preset_tokenizer
from medjax.tokenizer.files import load_tokenizer

__all__ = ["BUILTIN_CHAT_TEMPLATES", "Tokenizer", "byte_tokenizer", "load_tokenizer", "preset_tokenizer"]
