"""HF → medjax → save_hf → transformers reload gives the original logits."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import medjax
from hf_fixtures import make_tiny_hf_model
from medjax.errors import CheckpointError


@pytest.mark.parametrize("family", ["llama3", "mistral", "mixtral"])
def test_roundtrip_through_transformers(family, tmp_path):
    hf_model = make_tiny_hf_model(family, seed=11)
    hf_model.save_pretrained(tmp_path / "src")
    model, _ = medjax.load(tmp_path / "src", progress=False)
    medjax.save_hf(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "rope_theta" in cfg and "rope_parameters" in cfg
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                                        output_loading_info=True)
    reloaded.eval()
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.tensor(np.random.default_rng(0).integers(0, 256, size=(2, 19)))
    with torch.no_grad():
        a, b = hf_model(ids).logits.numpy(), reloaded(ids).logits.numpy()
    assert np.abs(a - b).max() <= 1e-5


def test_sharded_export_and_reload(tmp_path):
    hf_model = make_tiny_hf_model("llama2", seed=2)
    hf_model.save_pretrained(tmp_path / "src")
    model, _ = medjax.load(tmp_path / "src", progress=False)
    medjax.save_hf(model, tmp_path / "out", max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    again, _ = medjax.load(tmp_path / "out", progress=False)
    ids = jnp.arange(12)[None]
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(again(ids)))


def test_export_refuses_source_dir_and_nonempty(tmp_path):
    hf_model = make_tiny_hf_model("llama2", seed=2)
    hf_model.save_pretrained(tmp_path / "src")
    before = sorted(p.name for p in (tmp_path / "src").iterdir())
    model, _ = medjax.load(tmp_path / "src", progress=False)
    with pytest.raises(CheckpointError, match="loaded from"):
        medjax.save_hf(model, tmp_path / "src", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        medjax.save_hf(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    assert not list(tmp_path.glob(".*tmp-*"))


def test_stale_tmp_of_killed_export_is_cleaned(tmp_path):
    hf_model = make_tiny_hf_model("llama2", seed=2)
    hf_model.save_pretrained(tmp_path / "src")
    model, _ = medjax.load(tmp_path / "src", progress=False)
    (tmp_path / ".out.tmp-dead").mkdir()
    (tmp_path / ".out.tmp-dead" / "model-00001.safetensors").write_bytes(b"partial")
    medjax.save_hf(model, tmp_path / "out")
    assert not list(tmp_path.glob(".out.tmp-*")) and (tmp_path / "out" / "config.json").is_file()
