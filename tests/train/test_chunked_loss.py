"""The training loss runs the output head chunk by chunk (``Decoder.token_nll``): the same loss and
gradients as the whole ``[B, T, V]`` logits, without holding them."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax.config import load_config
from medjax.config.sections import LoraSection
from medjax.lora import apply_lora
from medjax.models import decoder, get_preset, init_decoder
from medjax.plan.compile import loss_loop_flops
from medjax.train.objectives import DPO, CausalLM
from medjax.train.step import accumulate_grads, split_model
from tests.train.test_step import _batch


def _one_chunk(T, V):            # the plain computation: the whole [B, T, V] logits at once
    return T


def _fresh_jit():
    """The train step's gradients, traced anew (jit's trace cache is per function: a cached
    trace would not see the patched chunking)."""
    return jax.jit(functools.partial(accumulate_grads),
                   static_argnames=("graphdef", "grad_accum", "objective"))


def _grads(model, batch, objective, monkeypatch, chunk_fn, lora=False, grad_accum=1):
    monkeypatch.setattr(decoder, "loss_chunk", chunk_fn)
    graphdef, params, rngs, frozen = split_model(model, lora=lora)
    run = _fresh_jit()
    grads, _, metrics = run(params, rngs, frozen, {}, batch, graphdef=graphdef,
                            grad_accum=grad_accum, objective=objective)
    return grads, metrics


@pytest.mark.parametrize("preset, objective", [("tiny-mixtral", "sft"), ("tiny-llama", "dpo")])
def test_chunked_loss_and_grads_equal_the_whole_logits(preset, objective, monkeypatch):
    """Chunks of 6 tokens over T = 16 (the last one padded), ragged rows with prompt masks, the
    Mixtral router loss (SFT, 2 micro-batches), LoRA adapters and the reference (DPO), fp32."""
    model = init_decoder(get_preset(preset), seed=0, attention_impl="xla", remat="full")
    lora = objective == "dpo"
    if lora:                # adapters moved off B = 0, so the policy is not its reference
        apply_lora(model, LoraSection(enabled=True, rank=4))
        leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
        keys = jax.random.split(jax.random.key(3), len(leaves))
        nnx.update(model, jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                                       for x, k in zip(leaves, keys)]))
        batch = {p + k: v for p, seed in (("chosen_", 0), ("rejected_", 1))
                 for k, v in _batch(B=4, seed=seed).items()}
        obj = DPO(beta=0.1)
    else:
        batch, obj = _batch(B=4), CausalLM(aux_coef=0.02)
    g_all, m_all = _grads(model, batch, obj, monkeypatch, _one_chunk, lora, 1 if lora else 2)
    g_chunk, m_chunk = _grads(model, batch, obj, monkeypatch, lambda T, V: 6, lora, 1 if lora else 2)
    for k in m_all:
        np.testing.assert_allclose(m_chunk[k], m_all[k], rtol=1e-6, atol=1e-7, err_msg=k)
    for (k, a), (_, b) in zip(nnx.to_flat_state(g_all), nnx.to_flat_state(g_chunk)):
        np.testing.assert_allclose(np.asarray(b.get_value()), np.asarray(a.get_value()),
                                   rtol=1e-5, atol=1e-7, err_msg=str(k))


def test_chunked_nll_keeps_leading_dims_and_ties_the_head():
    """Micro-batched hidden states ``[M, B, T, H]`` (the pipeline's) and a tied head."""
    cfg = dataclasses.replace(get_preset("tiny-llama"), tie_word_embeddings=True)
    model = init_decoder(cfg, seed=0, attention_impl="xla")
    ids = jax.random.randint(jax.random.key(0), (2, 3, 16), 3, cfg.vocab_size)
    targets = jnp.roll(ids, -1, axis=-1)

    @jax.jit
    def both(ids):
        h = jnp.stack([model.forward(x, head=False).hidden for x in ids])     # [M, B, T, H]
        return model.token_nll(h, targets, chunk=5), decoder.logits_nll(model.head(h), targets)
    chunked, whole = both(ids)
    assert chunked.shape == (2, 3, 16)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_default_chunking_cuts_the_compiled_steps_memory():
    """Llama-3's 128256 vocabulary at T = 1024 (a vocabulary-heavy tiny model, hidden 64): the
    default chunk is 256 tokens, and XLA:CPU's compiled step holds far less than with the whole
    ``[1, 1024, 128256]`` fp32 logits (0.49 GiB). Its FLOPs, with the chunk loop's other three
    trips added (``cost_analysis`` counts a loop body once; ``plan.compile.loss_loop_flops``), are
    the whole logits' plus one head forward: the recomputation in the backward."""
    cfg = dataclasses.replace(get_preset("tiny-llama"), vocab_size=128256, num_layers=1)
    assert decoder.loss_chunk(1024, cfg.vocab_size) == 256
    model = init_decoder(cfg, seed=0, attention_impl="xla")
    graphdef, params, rngs, frozen = split_model(model, lora=False)
    batch = _batch(B=1, T=1024, vocab=cfg.vocab_size)
    temps, flops = {}, {}
    for name, chunk_fn in (("whole", _one_chunk), ("chunked", decoder.loss_chunk)):
        decoder_loss_chunk = decoder.loss_chunk
        decoder.loss_chunk = chunk_fn
        try:
            compiled = _fresh_jit().lower(params, rngs, frozen, {}, batch, graphdef=graphdef,
                                          grad_accum=1, objective=CausalLM()).compile()
        finally:
            decoder.loss_chunk = decoder_loss_chunk
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
        cost = compiled.cost_analysis()
        flops[name] = (cost[0] if isinstance(cost, list) else cost)["flops"]
    logits = 1024 * cfg.vocab_size * 4
    assert temps["whole"] - temps["chunked"] > logits, {k: v / 2**20 for k, v in temps.items()}
    run = load_config(None, ["model.preset=tiny-llama", "data.seq_len=1024", "train.batch_size=1"])
    head_pass = 2 * 1024 * cfg.hidden_size * cfg.vocab_size
    counted = flops["chunked"] + loss_loop_flops(run, cfg)
    assert counted / (flops["whole"] + head_pass) == pytest.approx(1.0, abs=0.03), (flops, counted)


def test_plan_compile_flops_agree_with_and_without_the_layer_scan(tmp_path, capsys, monkeypatch):
    """``plan --compile``'s FLOPs per step when the micro-batch loop, the layer scan and the loss's
    chunk loop each count their body once: a 4-layer Llama (hidden 512, vocabulary 32768: the
    head is about a fifth of the FLOPs), two 128-token loss chunks at T = 256, 2 micro-batches,
    full remat. Unrolled, the count is exact (the micro-batch body x 2 + the other head chunk).
    Scanned, the count (one layer, one head chunk) plus the other head chunk is scaled by the
    model FLOPs' all-layers / one-layer ratio: 4% over the unrolled count (the scale weighs a
    layer and the head by their model FLOPs, 3 passes each, while the compiled step runs a
    layer 1.27x and the checkpointed head chunks 1.37x that); adding the other chunk after
    the scaling instead is 12% under."""
    import json
    import re

    from medjax.plan.__main__ import main as plan_main
    cfg = dataclasses.replace(get_preset("tiny-llama2"), num_layers=4, hidden_size=512,
                              intermediate_size=8192, num_heads=8, num_kv_heads=8, head_dim=64,
                              vocab_size=32768)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config("float32")))
    monkeypatch.setattr(decoder, "LOSS_CHUNK_LOGITS", 128 * cfg.vocab_size)
    assert decoder.loss_chunk(256, cfg.vocab_size) == 128
    flops = {}
    for scan in ("true", "false"):
        assert plan_main(["--config", "configs/meditron_llama2_cpt.yaml", f"model.path={tmp_path}",
                          "model.preset=null", "mesh.preset=dp", "mesh.tensor=1", "data.seq_len=256",
                          "train.batch_size=2", "train.grad_accum=2", f"model.scan_layers={scan}",
                          "--device", "cpu", "--compile"]) == 0
        out = capsys.readouterr().out
        flops[scan] = float(re.search(r"FLOPs per step per device: compiled ([\d.e+]+)", out).group(1))
    assert flops["true"] / flops["false"] == pytest.approx(1.0, abs=0.06), flops
