"""LoRA surgery, merge/unmerge, merged HF export and the PEFT adapter against transformers+peft."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
from train_helpers import make_tiny_model_dir, tiny_config, write_alpaca  # noqa: E402

import medjax  # noqa: E402
from medjax import lora  # noqa: E402
from medjax.config import LoraSection  # noqa: E402
from medjax.models import get_preset, init_decoder  # noqa: E402


def _randomise_adapters(model, seed=0):
    key = jax.random.key(seed)
    for _, wrapper in lora.lora_modules(model):
        for _, adapter in lora.weight_adapters(wrapper):
            key, sub = jax.random.split(key)
            adapter.lora_b[...] = 0.05 * jax.random.normal(sub, adapter.lora_b[...].shape)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mixtral"])
def test_wrap_merge_unmerge(preset):
    model = init_decoder(get_preset(preset), seed=0, attention_impl="xla")
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 500)
    base_logits = model(ids)
    targets = LoraSection().targets + (("block_sparse_moe.gate",) if "mixtral" in preset else ())
    _, wrapped = lora.apply_lora(model, LoraSection(enabled=True, rank=4, targets=targets))
    if "mixtral" in preset:
        assert "model.layers.0.block_sparse_moe.experts" in wrapped
        assert "model.layers.0.block_sparse_moe.gate" in wrapped
        experts = model.model.layers[0].block_sparse_moe.experts
        assert experts.gate_proj.lora_a[...].shape == (4, 64, 4)   # one adapter per expert
    np.testing.assert_array_equal(model(ids), base_logits)           # B = 0 at init
    _randomise_adapters(model)
    lora_logits = model(ids)
    assert float(jnp.abs(lora_logits - base_logits).max()) > 1e-3
    merged = lora.merged_model(model)
    assert not lora.lora_modules(merged)
    np.testing.assert_allclose(merged(ids), lora_logits, atol=1e-5)
    lora.merge_lora(model)
    np.testing.assert_allclose(model(ids), lora_logits, atol=1e-5)
    lora.unmerge_lora(model)
    np.testing.assert_allclose(model(ids), lora_logits, atol=1e-5)
    assert lora.count_params(model, nnx.LoRAParam) > 0


def test_expert_adapter_matches_dense_per_expert_reference():
    """The grouped (ragged_dot) adapter equals x @ (W_e + s A_e B_e) for each token's expert."""
    from medjax.models.moe import Experts
    cfg = get_preset("tiny-mixtral")
    base = Experts(cfg, rngs=nnx.Rngs(0))
    wrapper = lora.LoRAExperts(base, projections=("up_proj",), rank=3, alpha=6.0, rngs=nnx.Rngs(1))
    wrapper.up_proj.lora_b[...] = jax.random.normal(jax.random.key(2), wrapper.up_proj.lora_b[...].shape)
    group_sizes = jnp.array([3, 0, 4, 1], jnp.int32)
    x = jax.random.normal(jax.random.key(3), (8, cfg.hidden_size))
    got = wrapper.project("up_proj", x, group_sizes)
    expert_of_row = np.repeat(np.arange(4), np.asarray(group_sizes))
    w = base.up_proj[...] + 2.0 * jnp.einsum("eir,ero->eio", wrapper.up_proj.lora_a[...],
                                             wrapper.up_proj.lora_b[...])
    want = jnp.einsum("ni,nio->no", x, w[expert_of_row])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    """A LoRA run of 12 steps on a tiny llama, exported as merged HF + PEFT."""
    from medjax.run import run
    root = tmp_path_factory.mktemp("lora_run")
    model_dir = make_tiny_model_dir(root / "base")
    data = write_alpaca(root / "train.jsonl")
    cfg = tiny_config(model_dir, data, root / "run", train__steps=12, lora__enabled=True,
                      lora__rank=4, lora__alpha=8.0, lora__dropout=0.1, train__export=("hf", "peft"))
    summary = run(cfg, show_bar=False)
    return model_dir, root / "run", summary, cfg


def _lora_model(model_dir, run_dir, cfg):
    """The trained LoRA model rebuilt from the last checkpoint."""
    from medjax.train.loop import Trainer
    from medjax.train.setup import base_model
    from medjax.train.objectives import objective_for
    model, tok = base_model(cfg)
    trainer = Trainer(cfg, objective_for(cfg), model, tok, show_bar=False)
    assert trainer.resume()
    return nnx.view(trainer.model(), deterministic=True, raise_if_not_found=False)


def test_merged_export_logits_equal_lora_model(trained_lora):
    model_dir, run_dir, summary, cfg = trained_lora
    model = _lora_model(model_dir, run_dir, cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 259, (2, 20)))
    lora_logits = model(ids)
    exported, _ = medjax.load(run_dir / "export" / "hf")
    np.testing.assert_allclose(exported(ids), lora_logits, atol=1e-5)
    base, _ = medjax.load(model_dir)
    assert float(jnp.abs(base(ids) - lora_logits).max()) > 1e-3   # the adapters did something


def test_peft_adapter_loads_onto_hf_base_and_matches(trained_lora):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers
    model_dir, run_dir, summary, cfg = trained_lora
    model = _lora_model(model_dir, run_dir, cfg)
    ids = np.random.default_rng(1).integers(3, 259, (2, 20))
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, run_dir / "export" / "peft").eval()
    with torch.no_grad():
        ref = peft_model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=1e-4)


def test_export_cli_from_checkpoint(trained_lora, tmp_path):
    from medjax.export.__main__ import main
    model_dir, run_dir, summary, cfg = trained_lora
    assert main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"), "--merge-lora"]) == 0
    assert main(["--checkpoint", str(run_dir / "checkpoints"), "--out", str(tmp_path / "peft"), "--peft"]) == 0
    ids = jnp.asarray(np.random.default_rng(2).integers(3, 259, (1, 16)))
    a, _ = medjax.load(tmp_path / "hf")
    b, _ = medjax.load(run_dir / "export" / "hf")
    np.testing.assert_allclose(a(ids), b(ids), atol=1e-6)
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_low_rank_hand_written_backward_equals_autodiff():
    from medjax.lora import low_rank
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 7, 12)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((12, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 9)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 7, 9)), jnp.float32)
    plain = lambda x, a, b: jnp.sum((x @ a @ b) * w)  # noqa: E731
    ours = lambda x, a, b: jnp.sum(low_rank(x, a, b) * w)  # noqa: E731
    np.testing.assert_allclose(ours(x, a, b), plain(x, a, b), rtol=1e-6)
    for g_ours, g_plain in zip(jax.grad(ours, (0, 1, 2))(x, a, b), jax.grad(plain, (0, 1, 2))(x, a, b)):
        assert g_ours.shape == g_plain.shape
        np.testing.assert_allclose(g_ours, g_plain, rtol=1e-5, atol=1e-5)


def test_export_cli_overwrites_only_when_asked_and_only_process_0_reports(trained_lora, tmp_path, capsys,
                                                                          monkeypatch):
    from medjax.cli_errors import run_cli
    from medjax.export.__main__ import main
    model_dir, run_dir, summary, cfg = trained_lora
    out, gguf = tmp_path / "hf", tmp_path / "model.gguf"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    gguf.write_bytes(b"old")
    for argv in (["--out", str(out)], ["--out", str(gguf), "--gguf", "f32"]):
        capsys.readouterr()
        assert run_cli(main, ["--checkpoint", str(run_dir), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out {argv[1]} exists") and "--overwrite" in err[0]
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and gguf.read_bytes() == b"old"   # untouched
    assert run_cli(main, ["--checkpoint", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()
    assert f"exported step 12 of {run_dir / 'checkpoints'} to" in capsys.readouterr().out
    monkeypatch.setattr("medjax.distributed.is_main_process", lambda: False)   # as process 1 sees it
    assert run_cli(main, ["--checkpoint", str(run_dir), "--out", str(tmp_path / "peft"), "--peft"]) == 0
    assert "exported" not in capsys.readouterr().out
