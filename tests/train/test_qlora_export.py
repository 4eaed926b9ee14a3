"""A QLoRA checkpoint restores exactly as it trained: ``python -m medjax.export --checkpoint``
writes the same merged model as the run's own export (adapters merged onto the dequantized
nf4 base they were trained against)."""
import numpy as np
from safetensors.numpy import load_file

from train_helpers import tiny_config


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_qlora_checkpoint_export_equals_in_run_export(tiny_llama_dir, tiny_alpaca, tmp_path):
    from medjax.export.__main__ import main
    from medjax.run import run
    cfg = tiny_config(tiny_llama_dir, tiny_alpaca, tmp_path / "run", train__steps=3, train__export=("hf",),
                      lora__enabled=True, lora__rank=4, lora__quantize="nf4", lora__quant_block=32,
                      optim__lr=5e-2)
    summary = run(cfg, show_bar=False)
    in_run = _tensors(tmp_path / "run" / "export" / "hf")
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "cli")]) == 0
    from_ckpt = _tensors(tmp_path / "cli")
    assert sorted(in_run) == sorted(from_ckpt) and len(in_run) > 0
    for name, w in in_run.items():
        np.testing.assert_array_equal(from_ckpt[name], w, err_msg=name)
    # the merge sits on the quantized base: a projection differs from the original fp32 weight
    base = _tensors(tiny_llama_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not np.allclose(in_run[q], base[q], atol=1e-6)
    assert summary["trainable_params"] > 0
