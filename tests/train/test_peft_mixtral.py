"""PEFT export of Mixtral router and expert adapters, loaded by peft onto a transformers-5 base."""
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_fixtures import make_tiny_hf  # noqa: E402

import medjax  # noqa: E402
from medjax import lora  # noqa: E402
from medjax.config import LoraSection  # noqa: E402
from medjax.hf.peft_export import save_peft  # noqa: E402

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf("mixtral", tmp_path_factory.mktemp("mixtral") / "base", seed=3)


@pytest.mark.parametrize("targets", [ALL, ("up_proj", "gate"), ("down_proj",)],
                         ids=["all", "up+router", "down"])
def test_peft_mixtral_logits_match(hf_dir, tmp_path, targets):
    model, _ = medjax.load(hf_dir)
    ids = np.random.default_rng(0).integers(3, 256, (2, 16))
    base_logits = np.asarray(model(jnp.asarray(ids)))
    lora.apply_lora(model, LoraSection(enabled=True, rank=4, alpha=8, targets=targets))
    key = jax.random.key(1)
    for _, wrapper in lora.lora_modules(model):
        for _, adapter in lora.weight_adapters(wrapper):
            key, sub = jax.random.split(key)
            adapter.lora_b[...] = 0.2 * jax.random.normal(sub, adapter.lora_b[...].shape)
    ours = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(ours - base_logits).max() > 1e-2        # the adapters do something

    out = save_peft(model, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        ref = peft_model(torch.as_tensor(ids)).logits.numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"{'+'.join(targets)}: max |medjax - peft| = {diff:.2e}, config targets "
          f"{config['target_modules']} / {config['target_parameters']}, ranks {config['rank_pattern']}")
    assert diff <= 1e-4
    if "gate_proj" in targets:   # gate+up fused into one rank-2r adapter, alpha doubled
        assert config["rank_pattern"]["model.layers.0.mlp.experts.gate_up_proj"] == 8
        assert config["alpha_pattern"]["model.layers.0.mlp.experts.gate_up_proj"] == 16.0
    # PEFT holds exactly the exported tensors: each one loaded (none left at its zero init), and no
    # extra adapters (target_modules=None would have added PEFT's defaults q_proj/v_proj)
    from safetensors.numpy import load_file
    saved = load_file(str(out / "adapter_model.safetensors"))
    state = peft.get_peft_model_state_dict(peft_model)
    assert sorted(state) == sorted(saved)
    for name, arr in saved.items():
        np.testing.assert_array_equal(state[name].numpy(), arr, err_msg=name)
