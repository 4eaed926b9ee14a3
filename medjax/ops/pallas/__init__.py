"""Own Pallas kernels (Triton on GPU, Mosaic on TPU, interpret on CPU), one per file."""
from medjax.ops.pallas.decode_attention import decode_attention
from medjax.ops.pallas.flash_attention import flash_attention

__all__ = ["decode_attention", "flash_attention"]
