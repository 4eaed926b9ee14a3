"""Pipeline stages (``mesh.stage``) on the paths that load or combine: a run's LoRA dropout under
DPO, QLoRA started from an HF checkpoint (nf4 quantized as it streams into the stages) with its
export, and ``python -m medjax.eval`` of a GGUF loaded straight into the stages. Each equals the
run without stages within 1e-5, through the CLIs in-process on the session's 8 simulated CPU
devices (test_pipeline.py has the plain training paths)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.distributed.test_pipeline import ONE, ROOT, _eval, _losses, _same_scores, _train

pytestmark = [pytest.mark.multidevice, pytest.mark.slow]

sys.path.insert(0, str(ROOT / "tests" / "train"))
DPO = str(ROOT / "configs" / "med42_dpo.yaml")
QLORA = str(ROOT / "configs" / "bimedix_mixtral_qlora.yaml")
SHORT = ["train.steps=2", "train.batch_size=8", "train.grad_accum=2"]   # M = 2 micro-batches
STAGE2_FSDP4_R2 = ["mesh.preset=fsdp", "mesh.stage=2", "mesh.fsdp=4", "train.pipeline_repeats=2"]


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    """A tiny random HF Mixtral (4 layers: 2 stages x 2 repeats) with a byte tokenizer."""
    from train_helpers import make_tiny_model_dir
    return make_tiny_model_dir(tmp_path_factory.mktemp("hf") / "mixtral", "mixtral",
                               num_hidden_layers=4)


@pytest.fixture(scope="module")
def preferences(tmp_path_factory) -> Path:
    """Short preference pairs (the recipe's stand-in pairs need 448 byte tokens each)."""
    import json
    from train_helpers import FACTS
    rows = [{"prompt": f"What is {name}?", "chosen": f"{what}.", "rejected": f"{FACTS[i - 1][1]}."}
            for i, (name, what) in enumerate(FACTS)]
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    return path


def _two_runs(tmp_path, mesh_devices, config, reference, *overrides) -> tuple[list, list]:
    """The losses of ``config`` on ``reference`` (a mesh without stages, on as many devices as
    it names) and on 2 stages x fsdp 4 with R = 2 (8 devices)."""
    devices = 4 if "mesh.fsdp=4" in reference else 1
    with mesh_devices.use(devices):
        assert _train(tmp_path / "ref", config, *SHORT, *overrides, *reference) == 0
    with mesh_devices.use(8):
        assert _train(tmp_path / "pp", config, *SHORT, *overrides, *STAGE2_FSDP4_R2) == 0
    ref, got = _losses(tmp_path / "ref"), _losses(tmp_path / "pp")
    assert len(ref) == len(got) == 2 and ref[0] != ref[1]
    return ref, got


def test_dpo_lora_dropout_pipeline_trains_like_one_device(tmp_path, mesh_devices, preferences):
    """Med42's DPO with LoRA adapters and their dropout (the reference: the same weights with the
    adapters off, a second pipelined forward that draws nothing): 2 stages x fsdp 4, R = 2, gives
    the losses of one device within 1e-5. The dropout masks are those of the layer scan (each
    stage starts its streams at its micro-batch's and block's counter; models/pipeline.py), so
    one shifted counter changes them."""
    ref, got = _two_runs(tmp_path, mesh_devices, DPO, ONE, "model.preset=tiny-llama2-8l",
                         "lora.enabled=true", "lora.dropout=0.1", f"data.train={preferences}",
                         "data.seq_len=128")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_qlora_from_hf_pipeline_trains_and_exports_like_no_stages(tmp_path, mesh_devices, mixtral_dir):
    """BiMediX's QLoRA (nf4 base, LoRA on attention, experts and router, dropout 0.05) started
    from an HF Mixtral checkpoint: the nf4 codes stream into the stages (each layer written by
    the stage that holds it, hf/fill.py). 2 stages x fsdp 4, R = 2, gives the losses of fsdp 4
    without stages (a MoE layer draws its dropout over each device's routed rows: the same
    rows per device, not one device; test_pipeline.py) within 1e-5, and the merged HF export
    gives transformers the same logits."""
    ref, got = _two_runs(tmp_path, mesh_devices, QLORA, ["mesh.preset=fsdp", "mesh.fsdp=4"],
                         f"model.path={mixtral_dir}", "model.preset=null", "optim.eps=0.000001",
                         "lora.dropout=0.05", "train.export=[hf]")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)

    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([list(b"Aspirin inhibits platelets.")])
    logits = []
    for run in ("ref", "pp"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / run / "export" / "hf")
        with torch.no_grad():
            logits.append(model(ids).logits.numpy())
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-5)


def test_gguf_eval_in_stages_scores_like_one_device(tmp_path, mesh_devices, mixtral_dir):
    """``python -m medjax.eval --model X.gguf mesh.stage=4 mesh.data=2`` (a q8_0 GGUF of the
    tiny Mixtral, dequantized as it loads straight into the 4 stages, one layer each; float32:
    in the quantized GGUF's default bfloat16 the two differ by bf16 rounding, 2e-3): every
    per-choice log-likelihood of letter scoring equals the same command on one device."""
    import medjax
    model, tokenizer = medjax.load(mixtral_dir, progress=False)
    gguf = medjax.save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, type="q8_0")
    letter = ["--tasks", "medmcqa,medqa_4options", "--limit", "4", "--dtype", "float32"]
    with mesh_devices.use(1):
        ref = _eval(gguf, tmp_path / "one.json", *letter)
    with mesh_devices.use(8):
        got = _eval(gguf, tmp_path / "pp.json", *letter, "mesh.stage=4", "mesh.data=2")
    _same_scores(got, ref)
