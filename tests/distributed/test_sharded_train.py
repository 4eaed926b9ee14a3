"""8 simulated CPU devices: tiny Llama / Mixtral train 5 steps under every mesh preset.

In-process on the session's 8 forced CPU devices (tests/conftest.py, marker ``multidevice``).
"""
from __future__ import annotations


import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from medjax import sharding
from medjax.config import MeshSection
from medjax.models import get_preset
from tests.distributed import common

pytestmark = [pytest.mark.multidevice, pytest.mark.slow]

STEPS, BATCH = 5, 8
MESHES = {  # preset -> explicit axis sizes on 8 devices
    "dp": dict(data=8),
    "fsdp": dict(fsdp=8),
    "fsdp_tp": dict(fsdp=4, tensor=2),
    "fsdp_ep": dict(fsdp=2, expert=4),
}
# What each parameter's sharding must be, written out per preset (independent of the rules
# table): keyed by the parameter's role, found from its path below.
_T, _F, _E = "tensor", "fsdp", "expert"
EXPECTED = {
    "dp": {},
    "fsdp": {"embedding": P(None, _F), "qkv": P(_F, None), "o": P(None, _F),
             "up": P(_F, None), "down": P(None, _F), "router": P(_F, None),
             "experts_up": P(None, _F, None), "experts_down": P(None, None, _F),
             "lm_head": P(_F, None)},
    "fsdp_tp": {"embedding": P(_T, _F), "qkv": P(_F, _T), "o": P(_T, _F),
                "up": P(_F, _T), "down": P(_T, _F), "router": P(_F, None),
                "experts_up": P(None, _F, _T), "experts_down": P(None, _T, _F),
                "lm_head": P(_F, _T)},
    "fsdp_ep": {"embedding": P(None, _F), "qkv": P(_F, None), "o": P(None, _F),
                "up": P(_F, None), "down": P(None, _F), "router": P(_F, None),
                "experts_up": P(_E, _F, None), "experts_down": P(_E, None, _F),
                "lm_head": P(_F, None)},
}


def _role(path: str) -> str:
    if "norm" in path:
        return "norm"
    for key, role in (("embed_tokens", "embedding"), ("lm_head", "lm_head"), ("o_proj", "o"),
                      ("q_proj", "qkv"), ("k_proj", "qkv"), ("v_proj", "qkv")):
        if key in path:
            return role
    if "experts" in path:
        return "experts_down" if "down_proj" in path else "experts_up"
    if "block_sparse_moe" in path and "gate" in path:
        return "router"
    if "down_proj" in path:
        return "down"
    if "gate_proj" in path or "up_proj" in path:
        return "up"
    raise AssertionError(f"unexpected parameter {path}")


def _expected_spec(preset: str, path: str, ndim: int) -> P:
    role = _role(path)
    spec = EXPECTED[preset].get(role, P(*([None] * ndim)))
    return spec


def _normalise(spec: P, ndim: int) -> tuple:
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    return tuple(e[0] if isinstance(e, tuple) and len(e) == 1 else e for e in entries)


@pytest.fixture(scope="module")
def reference_losses():
    """Single-device losses (a 1-device mesh) of medjax.train's step for each model."""
    out = {}
    one = sharding.make_mesh(MeshSection(preset="dp"), devices=jax.devices()[:1])
    for model in ("tiny-llama", "tiny-mixtral"):
        step, state, frozen = common.training_setup(model, one, sharding.rules_for("dp"))
        losses = []
        for tokens in common.batches(STEPS, BATCH, get_preset(model).vocab_size):
            batch = sharding.global_batch(common.lm_batch(tokens), one)
            state, metrics = step(state, frozen, batch)
            losses.append(float(metrics["loss"]))
        out[model] = losses
    return out


def test_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py gives the session 8 CPU devices"


def _train(step, state, frozen, model_name, mesh):
    """STEPS steps on the shared random batches, placed as global batches on ``mesh``."""
    losses = []
    for tokens in common.batches(STEPS, BATCH, get_preset(model_name).vocab_size):
        state, metrics = step(state, frozen, sharding.global_batch(common.lm_batch(tokens), mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("preset", list(MESHES))
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-mixtral"])
def test_preset_trains_like_single_device(model_name, preset, reference_losses):
    cfg = MeshSection(preset=preset, **MESHES[preset])
    mesh = sharding.make_mesh(cfg)
    assert dict(mesh.shape) == {**{a: 1 for a in sharding.MESH_AXES}, **MESHES[preset]}
    sharding.check_model(get_preset(model_name), mesh.shape)
    rules = sharding.rules_for(preset)

    step, state, frozen = common.training_setup(model_name, mesh, rules)
    state, losses = _train(step, state, frozen, model_name, mesh)
    np.testing.assert_allclose(losses, reference_losses[model_name], rtol=0, atol=1e-5)

    # every parameter AND its AdamW moments are laid out as the preset says, after training
    params = 0
    flat = jax.tree_util.tree_flatten_with_path((state.params, state.opt_state),
                                                is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, variable in flat:
        name = jax.tree_util.keystr(path)
        value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        if not isinstance(variable, nnx.Param) and value.ndim == 0:
            continue  # step counters
        want = _normalise(_expected_spec(preset, name, value.ndim), value.ndim)
        got = _normalise(value.sharding.spec, value.ndim)
        assert got == want, f"{preset} {name}: spec {got} != expected {want}"
        shard_shape = value.addressable_shards[0].data.shape
        parts = [1 if e is None else mesh.shape[e] for e in want]
        assert shard_shape == tuple(d // p for d, p in zip(value.shape, parts)), name
        params += isinstance(variable, nnx.Param)
    assert params >= 10


@pytest.mark.parametrize("model_name, preset", [("tiny-llama", "fsdp_tp"), ("tiny-mixtral", "fsdp_ep")])
def test_scanned_layers_train_like_single_device_loop(model_name, preset, reference_losses):
    """Stacked layers (``scan_layers``): the same losses as the 1-device loop run, and every
    stacked parameter has the preset's sharding with its leading ``layers`` axis whole."""
    mesh = sharding.make_mesh(MeshSection(preset=preset, **MESHES[preset]))
    step, state, frozen = common.training_setup(model_name, mesh, sharding.rules_for(preset),
                                                scan_layers=True)
    state, losses = _train(step, state, frozen, model_name, mesh)
    np.testing.assert_allclose(losses, reference_losses[model_name], rtol=0, atol=1e-5)
    stacked = 0
    for path, variable in nnx.to_flat_state(state.params):
        name, value = ".".join(map(str, path)), variable.get_value()
        lead = (None,) if ".layers." in f".{name}." else ()
        stacked += bool(lead)
        want = _normalise(P(*lead, *_expected_spec(preset, name, value.ndim - len(lead))), value.ndim)
        assert _normalise(value.sharding.spec, value.ndim) == want, f"{preset} {name}"
    assert stacked >= 5


def test_init_sharded_materialises_only_shards():
    cfg = get_preset("tiny-mixtral")
    mesh = sharding.make_mesh(MeshSection(preset="fsdp_ep", fsdp=2, expert=4))
    from medjax.models import Decoder
    model = sharding.init_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh,
                                  sharding.rules_for("fsdp_ep"))
    w = model.model.layers[0].block_sparse_moe.experts.gate_proj.get_value()
    assert w.sharding.spec == P("expert", "fsdp", None)
    assert w.addressable_shards[0].data.shape == (cfg.num_experts // 4, cfg.hidden_size // 2,
                                                  cfg.intermediate_size)
    reference = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)))
    # jit-compiled init may differ from eager init by an ulp of the scaling multiply
    np.testing.assert_allclose(np.asarray(w), np.asarray(
        reference["model"]["layers"][0]["block_sparse_moe"]["experts"]["gate_proj"].get_value()),
        rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("family, preset, sizes", [("mixtral", "fsdp_ep", dict(fsdp=2, expert=4)),
                                                   ("llama3", "fsdp_tp", dict(fsdp=4, tensor=2))])
def test_hf_import_lands_in_the_rules_layout(tmp_path, family, preset, sizes):
    """medjax.load(shardings=loader_shardings(...)) places every tensor as the rules say,
    with the values of an unsharded load."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_fixtures import make_tiny_hf

    import medjax
    from medjax.hf.load import read_hf_config
    path = make_tiny_hf(family, tmp_path / family, seed=3)
    mesh = sharding.make_mesh(MeshSection(preset=preset, **sizes))
    rules = sharding.rules_for(preset)
    model_cfg = read_hf_config(path)
    sharded, _ = medjax.load(path, shardings=sharding.loader_shardings(model_cfg, mesh, rules),
                             progress=False)
    reference, _ = medjax.load(path, progress=False)
    want = sharding.param_shardings(reference, mesh, rules)
    flat_want = dict(nnx.to_flat_state(want))
    for path_, var in nnx.to_flat_state(nnx.state(sharded)):
        value = var.get_value()
        assert value.sharding.is_equivalent_to(flat_want[path_].get_value(), value.ndim), path_
    for (p, a), b in zip(nnx.to_flat_state(nnx.state(reference)),
                         nnx.to_flat_state(nnx.state(sharded)).leaves):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), str(p))
    q = sharded.model.layers[0].self_attn.q_proj.kernel.get_value()
    assert len(q.sharding.device_set) == 8
