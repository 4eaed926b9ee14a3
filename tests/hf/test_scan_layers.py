"""Stacked layers (``scan_layers=True``) on the HF / GGUF / PEFT / checkpoint paths: per-layer
names map to and from slice ``[i]`` of the stacked arrays; the sharded import still reads each
block once; QLoRA streaming quantizes each layer as the loop layout does."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import medjax
from hf_fixtures import make_tiny_hf, make_tiny_hf_model
from medjax.models.stack import per_layer_flat


def _assert_same_per_layer(loop_model, scan_model, filt=nnx.Param):
    a = per_layer_flat(nnx.to_flat_state(nnx.state(loop_model, filt)))
    b = per_layer_flat(nnx.to_flat_state(nnx.state(scan_model, filt)))
    assert sorted(a, key=str) == sorted(b, key=str)
    for path, var in a.items():
        np.testing.assert_array_equal(np.asarray(b[path].get_value()), np.asarray(var.get_value()),
                                      err_msg=str(path))


@pytest.mark.parametrize("family", ["llama3", "mixtral"])
def test_stacked_import_export_round_trip_through_transformers(family, tmp_path):
    import torch
    import transformers
    hf_model = make_tiny_hf_model(family, seed=11)
    hf_model.save_pretrained(tmp_path / "src")
    loop, _ = medjax.load(tmp_path / "src", progress=False)
    scan, _ = medjax.load(tmp_path / "src", progress=False, scan_layers=True)
    assert scan.model.layers.self_attn.q_proj.kernel[...].ndim == 3
    _assert_same_per_layer(loop, scan)
    ids_np = np.random.default_rng(0).integers(0, 256, size=(2, 19))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids_np)).logits.numpy()
    np.testing.assert_allclose(np.asarray(scan(jnp.asarray(ids_np))), ref, atol=2e-5)
    medjax.save_hf(scan, tmp_path / "out", max_shard_bytes=200_000)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert np.abs(reloaded(torch.tensor(ids_np)).logits.numpy() - ref).max() <= 1e-5


def test_stacked_gguf_import_and_export(tmp_path):
    d = make_tiny_hf("llama2", tmp_path / "src", seed=4)
    loop, tok = medjax.load(d, progress=False)
    medjax.save_gguf(loop, tmp_path / "loop.gguf", tokenizer=tok, type="f32")
    scan, _ = medjax.load(tmp_path / "loop.gguf", scan_layers=True)
    _assert_same_per_layer(loop, scan)
    medjax.save_gguf(scan, tmp_path / "scan.gguf", tokenizer=tok, type="f32")
    again, _ = medjax.load(tmp_path / "scan.gguf")
    _assert_same_per_layer(loop, again)


@pytest.mark.parametrize("fmt", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_stacked_qlora_streaming_quantizes_each_layer_as_the_loop(fmt, tmp_path):
    from medjax.config import LoraSection
    from medjax.lora import apply_lora
    from medjax.quant import QuantizedArray, quant_report, quantize_model
    d = make_tiny_hf("mixtral", tmp_path / "src", seed=6)
    lcfg = LoraSection(enabled=True, rank=4, targets=("q_proj", "experts"), quantize=fmt,
                       double_quant=fmt == "nf4", quant_block=32)

    def prepare(m):
        apply_lora(m, lcfg)
        quantize_model(m, fmt, block=32, double_quant=lcfg.double_quant)
    loop, _ = medjax.load(d, progress=False, prepare=prepare)
    scan, _ = medjax.load(d, progress=False, prepare=prepare, scan_layers=True)
    _assert_same_per_layer(loop, scan, QuantizedArray)
    ids = jnp.arange(14)[None] % 256
    np.testing.assert_allclose(np.asarray(scan(ids)), np.asarray(loop(ids)), rtol=1e-5, atol=1e-5)
    a, b = quant_report(loop, lcfg), quant_report(scan, lcfg)
    assert (a.quantized_params, a.total_params, a.total_bytes) == \
        (b.quantized_params, b.total_params, b.total_bytes)


@pytest.mark.slow   # the recipes' default-run exports go through it too (scan is their default)
def test_stacked_peft_export_writes_the_loop_files(tmp_path):
    from medjax.lora import lora_modules as lora_modules_of
    from safetensors.numpy import load_file

    from medjax.config import LoraSection
    from medjax.lora import apply_lora
    from medjax.hf.peft_export import save_peft
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "models"))
    from test_scan import copy_into_stacked
    d = make_tiny_hf("mixtral", tmp_path / "src", seed=7)
    lcfg = LoraSection(enabled=True, rank=4, targets=("q_proj", "v_proj", "experts", "gate"))
    models = []
    for scan in (False, True):
        m, _ = medjax.load(d, progress=False, scan_layers=scan)
        apply_lora(m, lcfg)
        models.append(m)
    leaves, treedef = jax.tree.flatten(nnx.state(models[0], nnx.LoRAParam))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(models[0], jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                                       for x, k in zip(leaves, keys)]))
    copy_into_stacked(*models)
    outs = [save_peft(m, tmp_path / f"peft{i}") for i, m in enumerate(models)]
    a, b = (load_file(o / "adapter_model.safetensors") for o in outs)
    assert sorted(a) == sorted(b) and any(".layers.1." in n for n in a)
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert json.loads((outs[0] / "adapter_config.json").read_text()) == \
        json.loads((outs[1] / "adapter_config.json").read_text())
    # the per-layer views the export reads slice the adapters only: the frozen base stays whole,
    # shared, never copied (unstacking it copied every stacked weight: 12 GiB at 7B)
    from medjax.hf.peft_export import _per_layer_wrappers
    stacked = dict(lora_modules_of(models[1]))
    for path, wrapper in _per_layer_wrappers(models[1]):
        whole = stacked[path.replace(".layers." + path.split(".layers.")[1].split(".")[0], ".layers", 1)]
        for (_, mine), (_, theirs) in zip(nnx.to_flat_state(nnx.state(wrapper.base)),
                                          nnx.to_flat_state(nnx.state(whole.base))):
            assert mine.get_value() is theirs.get_value(), path
