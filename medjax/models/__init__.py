"""One decoder for Llama-2/3, Mistral and Mixtral."""
from medjax.models.config import ModelConfig
from medjax.models.decoder import Decoder, DecoderOutput, KVCache, abstract_decoder, init_decoder
from medjax.models.layers import Embed, Linear, RMSNorm
from medjax.models.moe import Experts, SparseMoE
from medjax.models.presets import PRESETS, PUBLISHED_PARAMS, get as get_preset

__all__ = ["ModelConfig", "CheckpointError", "Decoder", "DecoderOutput", "KVCache",
           "abstract_decoder", "init_decoder", "Embed", "Linear", "RMSNorm", "Experts",
           "SparseMoE", "PRESETS", "PUBLISHED_PARAMS", "get_preset"]
