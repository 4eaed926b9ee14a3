"""Full-size presets: shapes and parameter counts via jax.eval_shape (no memory)."""
import jax
import pytest
from flax import nnx

from medjax.models import PRESETS, PUBLISHED_PARAMS, ModelConfig, abstract_decoder


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_count_matches_published(name):
    model = abstract_decoder(PRESETS[name])
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == PUBLISHED_PARAMS[name]
    assert PRESETS[name].num_params() == n


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("tiny-")])
def test_hf_config_round_trip(name):
    cfg = PRESETS[name]
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_llama3_rope_read_from_both_keys():
    new_style = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
                 "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}}
    old_style = {k: v for k, v in new_style.items() if k != "rope_parameters"}
    old_style.update(rope_theta=5e5, rope_scaling={k: v for k, v in new_style["rope_parameters"].items()
                                                   if k != "rope_theta"})
    a, b = ModelConfig.from_hf_config(new_style), ModelConfig.from_hf_config(old_style)
    assert a == b and a.rope_theta == 5e5 and a.rope_scaling["rope_type"] == "llama3"
    hf = a.to_hf_config()
    assert hf["rope_theta"] == 5e5 and hf["rope_scaling"]["rope_type"] == "llama3"
    assert hf["rope_parameters"]["rope_type"] == "llama3" and hf["rope_parameters"]["rope_theta"] == 5e5
