"""Sharding rules, mesh sizes and config validation (1 device); the 8-device preset checks are
tests/distributed/test_sharded_train.py."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from medjax import sharding
from medjax.config import ConfigError, MeshSection, load_config
from medjax.models import get_preset

REPO = Path(__file__).resolve().parents[1]


def test_presets_map_logical_axes():
    assert sharding.rules_for("dp").spec(("vocab", "embed")) == P(None, None)
    assert sharding.rules_for("fsdp").spec(("embed", "q_heads")) == P("fsdp", None)
    assert sharding.rules_for("fsdp_tp").spec(("embed", "q_heads")) == P("fsdp", "tensor")
    assert sharding.rules_for("fsdp_tp").spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert sharding.rules_for("fsdp_ep").spec(("experts", "embed", "mlp")) == P("expert", "fsdp", None)
    for preset in sharding.PRESETS:
        assert sharding.rules_for(preset).spec(("batch", "seq")) == P(("data", "fsdp", "expert"), None)
        assert sharding.rules_for(preset).spec(("norm",)) == P(None)


def test_collision_and_unknown_names_raise():
    rules = sharding.rules_for("fsdp_tp")
    with pytest.raises(sharding.ConfigError, match="'q_heads' and 'mlp' both map to mesh axis 'tensor'"):
        rules.spec(("q_heads", "mlp"), where="w")
    with pytest.raises(sharding.ConfigError, match="embed.*embed"):
        rules.spec(("embed", "embed"))
    with pytest.raises(sharding.ConfigError, match="logical axis 'hidden' has no rule"):
        rules.spec(("hidden",), where="model.x")
    custom = sharding.ShardingRules("custom", {"a": ("data", "fsdp"), "b": ("fsdp",)})
    with pytest.raises(sharding.ConfigError, match="mesh axis 'fsdp'"):
        custom.spec(("a", "b"))


@pytest.mark.parametrize("cfg, devices, want", [
    (dict(preset="dp"), 8, dict(data=8)),
    (dict(preset="fsdp"), 8, dict(fsdp=8)),
    (dict(preset="fsdp", data=2), 8, dict(data=2, fsdp=4)),
    (dict(preset="fsdp_tp", tensor=2), 8, dict(fsdp=4, tensor=2)),
    (dict(preset="fsdp_ep", expert=8), 64, dict(fsdp=8, expert=8)),
    (dict(preset="fsdp_tp", fsdp=2, tensor=-1), 8, dict(fsdp=2, tensor=4)),
    (dict(preset="fsdp"), 1, dict()),
])
def test_axis_sizes(cfg, devices, want):
    sizes = sharding.axis_sizes(MeshSection(**cfg), devices)
    assert sizes == {**{a: 1 for a in sharding.MESH_AXES}, **want}


@pytest.mark.parametrize("cfg, devices, match", [
    (dict(preset="fsdp", fsdp=3), 8, "multiply to 3"),
    (dict(preset="fsdp_tp", tensor=3), 8, "not divisible"),
    (dict(preset="fsdp", data=2, fsdp=2), 8, "multiply to 4, but there are 8"),
    (dict(preset="fsdp", data=4, dcn_data=3), 8, "dcn_data=3 must divide"),
])
def test_bad_axis_sizes_raise(cfg, devices, match):
    with pytest.raises(sharding.ConfigError, match=match):
        sharding.axis_sizes(MeshSection(**cfg), devices)


@pytest.mark.parametrize("override, match", [
    ("mesh.preset=zero3", "mesh.preset"),
    ("mesh.tensor=2", r"mesh.tensor=2 is unused by mesh.preset='dp'"),
    ("mesh.fsdp=0", "mesh.fsdp must be"),
    ("mesh.process_id=-1", "mesh.process_id"),
])
def test_mesh_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.preset=tiny-llama", override])


def test_model_checks():
    llama = get_preset("llama3-70b")          # 64 q heads, 8 kv heads
    sharding.check_model(llama, {"tensor": 8})
    with pytest.raises(sharding.ConfigError, match="num_kv_heads=8 is not divisible by mesh.tensor=16"):
        sharding.check_model(llama, {"tensor": 16})
    with pytest.raises(sharding.ConfigError, match="num_experts=8 is not divisible by mesh.expert=3"):
        sharding.check_model(get_preset("mixtral-8x7b"), {"expert": 3})


def test_indivisible_dim_is_an_error_not_replicated():
    devices = np.array(jax.devices()[:1] * 1)
    mesh = jax.sharding.Mesh(devices.reshape(1, 1, 1, 1, 1), sharding.MESH_AXES)
    rules = sharding.rules_for("fsdp")
    assert rules.sharding(mesh, ("embed", "mlp"), (6, 4)).spec == P("fsdp", None)
    abstract = jax.sharding.AbstractMesh((1, 1, 3, 1, 1), sharding.MESH_AXES)
    with pytest.raises(sharding.ConfigError, match=r"w: dim 0 \('embed', size 64\) is not divisible"):
        rules.sharding(abstract, ("embed", "mlp"), (64, 4), where="w")


def test_param_shardings_cover_every_param_on_one_device():
    from medjax.models import init_decoder
    model = init_decoder(get_preset("tiny-mixtral"))
    mesh = sharding.make_mesh(MeshSection(preset="fsdp_ep"))
    shardings = sharding.param_shardings(model, mesh, sharding.rules_for("fsdp_ep"))
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    assert len(specs) == len(jax.tree.leaves(model)) > 10
    sharding.shard_model(model, mesh, sharding.rules_for("fsdp_ep"))
    w = model.model.layers[0].block_sparse_moe.experts.down_proj.get_value()
    assert w.sharding.spec == P("expert", None, "fsdp")


def test_lora_adapters_follow_their_base_weights_layout():
    """Adapters inherit the base weight's logical axes (rank dim whole): expert adapters are
    split over `expert`, their input dim over `fsdp`."""
    from medjax.config import LoraSection
    from medjax.lora import apply_lora
    from medjax.models import init_decoder
    model = nnx.eval_shape(lambda: apply_lora(init_decoder(get_preset("tiny-mixtral")),
                                              LoraSection(enabled=True, rank=4))[0])
    mesh = jax.sharding.AbstractMesh((1, 1, 2, 1, 4), sharding.MESH_AXES)
    shardings = sharding.param_shardings(model, mesh, sharding.rules_for("fsdp_ep"))
    specs = {".".join(map(str, path)): v.get_value().spec for path, v in nnx.to_flat_state(shardings)}
    lora_specs = {k: v for k, v in specs.items() if "lora" in k.lower() or "adapter" in k.lower()}
    assert lora_specs, sorted(specs)[:20]
    expert_a = [v for k, v in lora_specs.items() if "experts" in k and "gate_proj" in k]
    q_proj = [v for k, v in lora_specs.items() if "q_proj" in k]
    assert P("expert", "fsdp", None) in expert_a and P("expert", None, None) in expert_a
    assert P("fsdp", None) in q_proj and P(None, None) in q_proj
