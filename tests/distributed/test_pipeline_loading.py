"""Pipeline stages (``mesh.stage``) on a run that starts from a checkpoint: QLoRA whose nf4 base
streams into the stages from a GGUF file, trained with DPO and LoRA dropout, equals the same run
from the HF checkpoint without stages, and its export gives transformers the same logits.
Through ``python -m medjax.train`` in-process on the session's 8 simulated CPU devices
(test_pipeline.py: the runs from a random init, and an HF export evaluated in stages).

A pipelined step compiles for seconds, so one pair of runs carries what the pipeline adds on
these paths (``python -m medjax.eval`` of a GGUF in stages, equal to one device, was a second
test: 8 s more; the fill that writes each layer into its stage is the same for eval, and the
pipelined eval forward is test_pipeline.py's)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.distributed.test_pipeline import ROOT, _losses, _train

pytestmark = [pytest.mark.multidevice, pytest.mark.slow]

QLORA = str(ROOT / "configs" / "bimedix_mixtral_qlora.yaml")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random HF Mixtral (4 layers: 2 stages x 2 repeats; byte tokenizer) and its f32
    GGUF (the same weights, exactly: tests/hf/test_gguf_export.py)."""
    import medjax
    from train.train_helpers import make_tiny_model_dir
    root = tmp_path_factory.mktemp("mixtral")
    hf = make_tiny_model_dir(root / "hf", "mixtral", num_hidden_layers=4)
    model, tokenizer = medjax.load(hf, progress=False)
    return hf, medjax.save_gguf(model, root / "m.gguf", tokenizer=tokenizer, type="f32")


@pytest.fixture(scope="module")
def preferences(tmp_path_factory) -> Path:
    """Short preference pairs (the recipe's stand-in pairs need 448 byte tokens each)."""
    from train.train_helpers import FACTS
    rows = [{"prompt": f"What is {name}?", "chosen": f"{what}.", "rejected": f"{FACTS[i - 1][1]}."}
            for i, (name, what) in enumerate(FACTS)]
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    return path


def test_qlora_dpo_from_gguf_in_stages_trains_and_exports_like_hf_without(
        tmp_path, mesh_devices, mixtral, preferences):
    """BiMediX's QLoRA (nf4 base; LoRA on attention, every expert and the router) trained with
    Med42's DPO and LoRA dropout 0.1, 2 steps of 2 micro-batches: from the HF checkpoint on fsdp 4,
    and from its GGUF on 2 stages x fsdp 4 with R = 2. One pair of runs for what the pipeline
    adds on these paths (a pipelined step compiles for seconds):
    - the nf4 codes quantized as they stream in and written by the stage that holds each layer
      (hf/fill.py: the stage split is the fill's, the same for both readers);
    - the DPO reference, the same weights with the adapters off: a second pipelined forward that
      draws no dropout mask;
    - the policy's masks, the layer scan's: each stage starts its streams at its micro-batch's
      and block's counter (models/pipeline.py); step 1's adapters are 0, step 2 shows them.
    The losses agree within 1e-5 (the reference is fsdp 4, not one device: a MoE layer draws
    its dropout over each device's routed rows, test_pipeline.py), and the merged HF exports
    give transformers the same logits."""
    hf, gguf = mixtral
    common = [   # optim.eps: test_pipeline.py's MODELS; remat in stages: test_pipeline.py
        "model.preset=null", "optim.eps=0.000001", "model.remat=none", "train.steps=2",
        "train.batch_size=8", "train.grad_accum=2", "train.objective=dpo",
        "data.format=preference", f"data.train={preferences}", "data.seq_len=96",
        "lora.dropout=0.1", "train.export=[hf]"]
    with mesh_devices.use(4):
        assert _train(tmp_path / "ref", QLORA, *common, f"model.path={hf}",
                      "mesh.preset=fsdp", "mesh.fsdp=4") == 0
    with mesh_devices.use(8):
        assert _train(tmp_path / "pp", QLORA, *common, f"model.path={gguf}", "mesh.preset=fsdp",
                      "mesh.stage=2", "mesh.fsdp=4", "train.pipeline_repeats=2") == 0
    ref, got = _losses(tmp_path / "ref"), _losses(tmp_path / "pp")
    assert len(ref) == len(got) == 2 and ref[0] != ref[1]
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

