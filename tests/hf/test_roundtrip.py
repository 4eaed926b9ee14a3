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


@pytest.mark.parametrize("family,scan", [("llama3", False), ("mixtral", True)])
def test_export_shapes_are_the_exported_tensors_shapes(family, scan, tmp_path):
    """save_hf writes each safetensors header from ``export_shapes`` before making any tensor."""
    from medjax.hf.names import export_shapes, export_tensors
    from medjax.models import get_preset, init_decoder
    from medjax.models.stack import per_layer_flat, read_value, value_shape
    from flax import nnx
    model = init_decoder(get_preset(f"tiny-{family}"), seed=0, scan_layers=scan)
    flat = per_layer_flat(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    made = [(n, a.shape) for n, a in export_tensors(
        model.config, lambda p, index=(): np.asarray(read_value(flat[p], index)))]
    assert list(export_shapes(model.config, lambda p: value_shape(flat[p]))) == made


def test_export_holds_one_tensor_not_a_shard(tmp_path, monkeypatch):
    """Each tensor is made just before its bytes are written, not a whole shard first (a 5 GiB
    shard held in memory made the Mixtral-width export peak at 2.3x the model)."""
    from medjax.hf import export as export_mod
    model, _ = medjax.load(_tiny_src(tmp_path), progress=False)
    events = []
    real_tensors, real_write = export_mod.export_tensors, export_mod.write_safetensors

    def spy_tensors(cfg, get):
        for name, arr in real_tensors(cfg, get):
            events.append(("made", name))
            yield name, arr

    def spy_write(path, tensors, **kw):
        def watch(name, chunks):
            for chunk in chunks:
                yield chunk
                events.append(("written", name))
        return real_write(path, [(n, d, s, watch(n, c)) for n, d, s, c in tensors], **kw)
    monkeypatch.setattr(export_mod, "export_tensors", spy_tensors)
    monkeypatch.setattr(export_mod, "write_safetensors", spy_write)
    medjax.save_hf(model, tmp_path / "out")
    names = [n for kind, n in events if kind == "made"]
    assert len(names) > 10
    assert events == [e for n in names for e in (("made", n), ("written", n))]


def _tiny_src(tmp_path):
    make_tiny_hf_model("llama2", seed=2).save_pretrained(tmp_path / "src")
    return tmp_path / "src"
