"""medjax logits vs transformers logits on tiny random checkpoints of every family."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import medjax
from hf_fixtures import FAMILIES, make_tiny_hf_model

LENGTHS = (5, 17, 33)  # several lengths; 17 and 33 exceed the tiny Mistral's window of 8


def _hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module", params=FAMILIES + ("mixtral8",))
def family_dir(request, tmp_path_factory):
    family, kw = request.param, {}
    if family == "mixtral8":
        family, kw = "mixtral", dict(num_local_experts=8, num_experts_per_tok=2)
    out = tmp_path_factory.mktemp(request.param)
    hf_model = make_tiny_hf_model(family, seed=3, **kw)
    hf_model.save_pretrained(out)
    return hf_model, out


def test_logits_match_transformers(family_dir):
    hf_model, path = family_dir
    model, _ = medjax.load(path, progress=False)
    rng = np.random.default_rng(0)
    for T in LENGTHS:
        ids = rng.integers(0, 256, size=(2, T))
        ref = _hf_logits(hf_model, ids)
        got = np.asarray(model(jnp.asarray(ids)))
        scale = np.abs(ref).max()
        assert np.abs(got - ref).max() <= 1e-4 * max(scale, 1.0), (T, np.abs(got - ref).max(), scale)


def test_fused_mixtral_layout_loads(tmp_path):
    """transformers-5 in-memory fused experts (gate_up_proj/down_proj) written as-is."""
    from safetensors.torch import save_file
    hf_model = make_tiny_hf_model("mixtral", seed=5)
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any("gate_up_proj" in k for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    hf_model.config.save_pretrained(tmp_path)
    model, _ = medjax.load(tmp_path, progress=False)
    ids = np.arange(24)[None] % 256
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _hf_logits(hf_model, ids),
                               atol=1e-4)


def test_router_aux_loss_matches_transformers(tmp_path):
    hf_model = make_tiny_hf_model("mixtral", seed=7)
    hf_model.save_pretrained(tmp_path)
    model, _ = medjax.load(tmp_path, progress=False)
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 16))
    with torch.no_grad():
        out = hf_model(torch.tensor(ids), output_router_logits=True)
    ours = model.forward(jnp.asarray(ids)).aux_loss
    np.testing.assert_allclose(float(ours), float(out.aux_loss), rtol=1e-5)


def test_bfloat16_params_and_compute(tmp_path):
    hf_model = make_tiny_hf_model("mistral", seed=9)
    hf_model.save_pretrained(tmp_path)
    model32, _ = medjax.load(tmp_path, progress=False)
    model16, _ = medjax.load(tmp_path, dtype=jnp.bfloat16, progress=False)
    assert model16.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    ids = jnp.arange(24)[None] % 256
    a, b = np.asarray(model32(ids)), np.asarray(model16(ids))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()


def test_logits_at_selects_positions(tmp_path):
    hf_model = make_tiny_hf_model("mixtral", seed=4)
    hf_model.save_pretrained(tmp_path)
    model, _ = medjax.load(tmp_path, progress=False)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, size=(3, 15)))
    at = jnp.asarray([[0, 14], [3, 7], [9, 9]])
    full = np.asarray(model(ids))
    part = np.asarray(model.forward(ids, logits_at=at).logits)
    np.testing.assert_allclose(part, np.take_along_axis(full, np.asarray(at)[..., None], 1), atol=1e-5)
