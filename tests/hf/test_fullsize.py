"""The full-size fixture and, in the slow suite, Llama-2-7B width through the product path:
a multi-file checkpoint (7B width and vocabulary, 2 layers) → 1 LoRA step with the MELT recipe
→ merged export sharded with an index → transformers' logits match medjax's."""
import json
from pathlib import Path

import numpy as np
import pytest

from medjax.bench import _fullsize_fixture as F

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["llama2-7b"])
def test_fixture_tensors_are_what_transformers_builds(preset):
    """Names and shapes of the fixture = transformers' model from the same config.json (meta device)."""
    import torch
    import transformers
    cfg = F.model_config(preset, 2)
    hf = cfg.to_hf_config("bfloat16")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert dict(F.hf_tensors(cfg)) == expected
    assert (hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"], hf["num_attention_heads"]) == \
        (32000, 4096, 11008, 32)


def test_mixtral_fixture_shapes():
    cfg = F.model_config("mixtral-8x7b-2l")
    shapes = dict(F.hf_tensors(cfg))
    assert cfg.num_layers == 2
    assert shapes["model.layers.1.block_sparse_moe.gate.weight"] == (8, 4096)
    assert shapes["model.layers.1.block_sparse_moe.experts.7.w2.weight"] == (4096, 14336)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)


def test_shards_split_at_the_limit():
    tensors = [("a", (10,)), ("b", (10,)), ("c", (30,)), ("d", (5,))]   # bf16: 20, 20, 60, 10 bytes
    assert [[n for n, _ in s] for s in F.plan_shards(tensors, 40)] == [["a", "b"], ["c"], ["d"]]


@pytest.mark.slow
def test_7b_width_two_layers_load_step_export_transformers(tmp_path, monkeypatch):
    import jax.numpy as jnp
    import medjax
    from medjax.cli_errors import run_cli
    from medjax.train.__main__ import main as train_main
    from medjax.train.restore import restore_trained_model
    from medjax.train.setup import plain_model

    fixture = F.write_fixture("llama2-7b", 2, tmp_path / "fixture", max_shard_bytes=600_000_000)
    index = json.loads((fixture / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    run = tmp_path / "run"
    monkeypatch.chdir(ROOT)
    assert run_cli(train_main, ["--config", "configs/melt_llama2_lora.yaml", "--no-progress",
                                f"model.path={fixture}", "model.preset=null", "data.seq_len=64",
                                "train.batch_size=1", "train.grad_accum=1", "train.steps=1",
                                "train.epochs=null", "train.export=[]", "eval.tasks=[]",
                                f"train.out_dir={run}", "checkpoint.every=0"]) == 0

    model, tokenizer, cfg, step = restore_trained_model(run / "checkpoints")
    assert step == 1 and cfg.lora.rank == 64 and cfg.model.remat == "full"
    plain = plain_model(model)
    ids = tokenizer.encode("A 45-year-old man presents with crushing chest pain radiating to the left arm.",
                           add_special_tokens=True)[:16]
    ours = np.asarray(plain(jnp.asarray([ids], jnp.int32)).astype(jnp.float32))[0]
    out = medjax.save_hf(plain, tmp_path / "hf", tokenizer=tokenizer, dtype="bfloat16",
                         max_shard_bytes=500_000_000)
    del model, plain
    exported = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(exported["weight_map"].values())) >= 2
    assert exported["metadata"]["total_size"] == sum(
        p.stat().st_size for p in out.glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.open("rb").read(8), "little") for p in out.glob("*.safetensors"))

    import torch
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float().numpy()
    rel = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    assert rel <= 2e-2, rel
