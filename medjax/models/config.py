"""ModelConfig: one frozen dataclass for Llama-2/3, Mistral and Mixtral, with HF conversion and presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from medjax.errors import CheckpointError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
_ARCH_FROM_HF = {v: k for k, v in ARCHITECTURES.items()}
_ROPE_TYPES = ("default", "linear", "llama3")




@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: Optional[int] = None          # default hidden_size // num_heads
    architecture: str = "llama"             # llama | mistral | mixtral
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None     # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    num_experts: int = 0                    # 0 = dense MLP
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int | list] = 2
    pad_token_id: Optional[int] = None
    extra_hf: dict = field(default_factory=dict, compare=False, hash=False)  # passthrough keys

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(f"architecture {self.architecture!r} not in {list(ARCHITECTURES)}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in _ROPE_TYPES:
                raise CheckpointError(f"rope_type {kind!r} not supported (supported: {_ROPE_TYPES})")
        if self.is_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise CheckpointError(f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                                  f"1..{self.num_experts} (num_local_experts)")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((_ARCH_FROM_HF[a] for a in archs if a in _ARCH_FROM_HF), None)
        if arch is None:
            arch = {"llama": "llama", "mistral": "mistral", "mixtral": "mixtral"}.get(hf.get("model_type"))
        if arch is None:
            raise CheckpointError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; medjax supports "
                f"{sorted(ARCHITECTURES.values())}")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise CheckpointError("attention_bias / mlp_bias = true is not supported")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"hidden_act {act!r} not supported (only silu)")
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
        known = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                 "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
                 "tie_word_embeddings", "sliding_window", "num_local_experts",
                 "num_experts_per_tok", "router_aux_loss_coef", "bos_token_id", "eos_token_id",
                 "pad_token_id", "architectures", "model_type", "hidden_act", "attention_bias",
                 "mlp_bias", "torch_dtype", "dtype", "transformers_version"}
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window") if arch != "llama" else None,
            num_experts=hf.get("num_local_experts", 0) if arch == "mixtral" else 0,
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            extra_hf={k: v for k, v in hf.items() if k not in known},
        )

    def to_hf_config(self, dtype: str = "float32") -> dict:
        """config.json content. Writes BOTH rope_theta/rope_scaling (old readers) and rope_parameters."""
        rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope_parameters.update(self.rope_scaling)
            rope_parameters.setdefault("rope_type", self.rope_scaling.get("type", "default"))
        hf = {
            **self.extra_hf,
            "architectures": [ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype,
            "torch_dtype": dtype,
        }
        if self.architecture == "llama":
            hf["mlp_bias"] = False
        else:
            hf["sliding_window"] = self.sliding_window
        if self.architecture == "mixtral":
            hf.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                      router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False)
        return hf

    # ------------------------------------------------------------------ counting
    def num_params(self) -> int:
        H, I, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        D = self.head_dim
        attn = H * D * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * H * I * (self.num_experts or 1) + (H * self.num_experts if self.is_moe else 0)
        per_layer = attn + mlp + 2 * H
        head = 0 if self.tie_word_embeddings else V * H
        return V * H + L * per_layer + H + head
