"""Stacked layers under a scan (``scan_layers=True``) compute what the layer loop computes:
logits, loss and gradients (through the product train step), with LoRA, QLoRA and remat, and
greedy decoding with the KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax.config import LoraSection
from medjax.lora import apply_lora
from medjax.models import get_preset, init_decoder
from medjax.models.stack import per_layer_flat, split_layer_path
from medjax.quant import quantize_model
from medjax.train import step as S
from medjax.train.objectives import CausalLM

MIXTRAL_TARGETS = ("q_proj", "v_proj", "o_proj", "experts", "block_sparse_moe.gate")
LLAMA_TARGETS = ("q_proj", "v_proj", "down_proj")


def _batch(B=2, T=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 512, (B, T + 1))
    lengths = rng.integers(T // 2, T + 1, B)
    seg = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    b = {"input_ids": ids[:, :-1] * seg, "targets": ids[:, 1:] * seg,
         "positions": np.broadcast_to(np.arange(T), (B, T)), "segment_ids": seg,
         "loss_mask": (seg * (np.arange(T)[None, :] >= 3)).astype(np.float32)}
    return {k: jnp.asarray(v) for k, v in b.items()}


def copy_into_stacked(loop_model, scan_model):
    """Every per-layer value of ``loop_model`` written to index ``i`` of ``scan_model``'s stack."""
    dst = dict(nnx.to_flat_state(nnx.state(scan_model, nnx.Not(nnx.RngState))))
    for path, var in nnx.to_flat_state(nnx.state(loop_model, nnx.Not(nnx.RngState))):
        key, i = split_layer_path(tuple(path))
        target = dst[key]
        value = var.get_value()
        target.set_value(value if i is None else target.get_value().at[i].set(value))
    nnx.update(scan_model, nnx.from_flat_state(list(dst.items())))


def _pair(preset, lora=None, quantize=None):
    """(loop model, scan model) with the same weights (random non-zero adapters with LoRA)."""
    models = []
    for scan in (False, True):
        m = init_decoder(get_preset(preset), seed=0, attention_impl="xla", scan_layers=scan)
        if lora is not None:
            apply_lora(m, LoraSection(enabled=True, rank=4, targets=lora, dropout=0.0))
        models.append(m)
    loop, scan = models
    if lora is not None:
        leaves, treedef = jax.tree.flatten(nnx.state(loop, nnx.LoRAParam))
        keys = jax.random.split(jax.random.key(3), len(leaves))
        nnx.update(loop, jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                                      for x, k in zip(leaves, keys)]))
    copy_into_stacked(loop, scan)
    if quantize:
        for m in (loop, scan):
            quantize_model(m, quantize, block=32)
    return loop, scan


def test_same_seed_gives_the_same_weights_in_both_layouts():
    loop = init_decoder(get_preset("tiny-mixtral"), seed=0)
    scan = init_decoder(get_preset("tiny-mixtral"), seed=0, scan_layers=True)
    flat_loop = dict(nnx.to_flat_state(nnx.state(loop, nnx.Param)))
    flat_scan = dict(nnx.to_flat_state(nnx.state(scan, nnx.Param)))
    assert sorted(per_layer_flat(flat_scan), key=str) == sorted(flat_loop, key=str)
    q = flat_scan[("model", "layers", "self_attn", "q_proj", "kernel")]
    assert q.get_value().shape == (2, 64, 64)
    assert q.get_metadata()["logical_axes"] == ("layers", "embed", "q_heads")
    for path, var in flat_loop.items():
        key, i = split_layer_path(path)
        got = flat_scan[key].get_value() if i is None else flat_scan[key].get_value()[i]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(var.get_value()), err_msg=str(path))


CASES = {
    "llama": dict(preset="tiny-llama2"),
    "llama_lora_remat": dict(preset="tiny-llama2", lora=LLAMA_TARGETS, remat="full"),
    "mixtral": dict(preset="tiny-mixtral"),
    "mixtral_lora_remat": dict(preset="tiny-mixtral", lora=MIXTRAL_TARGETS, remat="full"),
    "mixtral_qlora_nf4": dict(preset="tiny-mixtral", lora=MIXTRAL_TARGETS, quantize="nf4"),
}
SLOW = ("llama", "mixtral", "mixtral_qlora_nf4")     # covered by the LoRA + remat cases' paths


@nnx.jit
def _logits(model, ids, segment_ids):
    return model.forward(ids, segment_ids=segment_ids).logits


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c
                                  for c in CASES])
def test_scan_matches_loop_logits_loss_and_grads(case):
    kw = dict(CASES[case])
    remat = kw.pop("remat", "none")
    lora = kw.get("lora") is not None
    loop, scan = _pair(**kw)
    batch = _batch()
    logits = [_logits(m, batch["input_ids"], batch["segment_ids"]) for m in (loop, scan)]
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(logits[0]), rtol=1e-5, atol=1e-5)
    run = jax.jit(S.accumulate_grads, static_argnames=("graphdef", "grad_accum", "objective"))
    results = []
    for m in (loop, scan):
        m.remat = remat
        graphdef, params, rngs, frozen = S.split_model(m, lora)
        grads, _, metrics = run(params, rngs, frozen, {}, batch, graphdef=graphdef, grad_accum=1,
                                objective=CausalLM(aux_coef=0.02))
        results.append((float(metrics["loss"] + 0.02 * metrics["aux_loss"]), grads))
    (loss0, g0), (loss1, g1) = results
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    flat0 = dict(nnx.to_flat_state(g0))
    flat1 = dict(nnx.to_flat_state(g1))
    assert sorted(per_layer_flat(nnx.to_flat_state(g1)), key=str) == sorted(flat0, key=str)
    for path, g in flat0.items():
        key, i = split_layer_path(path)
        got = flat1[key].get_value() if i is None else flat1[key].get_value()[i]
        np.testing.assert_allclose(np.asarray(got), np.asarray(g.get_value()), rtol=1e-5, atol=1e-5,
                                   err_msg=str(path))
    assert any(float(jnp.abs(g.get_value()).max()) > 0 for g in flat0.values())


def test_scan_decoding_with_kv_cache_matches_loop():
    from medjax.eval.generate import Generator
    loop, scan = _pair("tiny-mistral")          # sliding window 8 < the 23 positions decoded
    prompts = np.random.default_rng(0).integers(3, 512, (2, 11)).tolist()
    prompts[1] = prompts[1][:7]
    outs = [Generator(m).generate(prompts, max_new_tokens=12, return_logits=True) for m in (loop, scan)]
    assert outs[1][0] == outs[0][0]
    np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (scan bodies, remat, pjit)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(sub, ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    yield from _eqns(sub)


def test_the_layer_scan_runs_on_weights_cast_to_the_compute_dtype(monkeypatch):
    """bf16 compute over fp32 masters (``stack.compute_weights``): every scan of the gradient's
    program (the forward, the backward) takes and returns the stacked weights ``[L, ...]`` in
    bf16, so the backward's stacked gradient is bf16 (half of fp32's; Llama-2-7B on v5p-8:
    3 GiB per chip, docs/PERFORMANCE.md); the loss and gradients are the ones the casts inside
    each layer give (the layers cast every weight to bf16 before using it)."""
    import functools

    from medjax.models import stack
    model = init_decoder(get_preset("tiny-llama2"), seed=0, attention_impl="xla", scan_layers=True,
                         dtype=jnp.bfloat16, param_dtype=jnp.float32)
    graphdef, params, rngs, frozen = S.split_model(model, False)
    batch = _batch()
    shapes = {tuple(x.shape) for x in jax.tree.leaves(nnx.state(model.model.layers, nnx.Param))}

    def run():
        grads_fn = functools.partial(S.accumulate_grads, graphdef=graphdef, grad_accum=1,
                                     objective=CausalLM())      # a new function: traced anew
        jaxpr = jax.make_jaxpr(grads_fn)(params, rngs, frozen, {}, batch)
        stacked = {str(v.aval.dtype) for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "scan"
                   for v in (*e.invars, *e.outvars)
                   if tuple(getattr(v.aval, "shape", ())) in shapes}
        return stacked, jax.jit(grads_fn)(params, rngs, frozen, {}, batch)

    stacked, (grads, _, metrics) = run()
    assert stacked == {"bfloat16"}, stacked
    cast_here = stack.compute_weights
    monkeypatch.setattr(stack, "compute_weights", lambda layers, dtype: cast_here(layers, None))
    stacked_inside, (grads_inside, _, metrics_inside) = run()
    assert "float32" in stacked_inside                   # the test sees the fp32 stack
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics_inside["loss"]), rtol=1e-6)
    for (path, g), (_, g_in) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(grads_inside)):
        assert g.get_value().dtype == jnp.float32, path
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(g_in.get_value()),
                                   rtol=1e-6, atol=1e-7, err_msg=str(path))


def test_the_pipeline_sums_the_micro_batches_layer_gradients_in_fp32(monkeypatch):
    """bf16 compute over fp32 masters, 2 pipeline stages, 2 micro-batches (models/pipeline.py):
    the stages run on the fp32 masters, so the backward of the scan over iterations sums the
    micro-batches' layer gradients in an fp32 carry: the gradients of the micro-batch loop
    without a pipeline (its fp32 accumulator; measured identical). On weights cast to bf16 before the
    pipeline (what the layer scan runs on, ``stack.compute_weights``) that carry is bf16 and
    rounds the sum: 0.3% of the largest element here."""
    import functools

    from medjax.models import pipeline, stack

    def layer_grads(stages):
        model = init_decoder(get_preset("tiny-llama2"), seed=0, attention_impl="xla",
                             scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.float32)
        model.pipeline_stages = stages
        graphdef, params, rngs, frozen = S.split_model(model, False)
        grads_fn = functools.partial(S.accumulate_grads, graphdef=graphdef, grad_accum=2,
                                     objective=CausalLM(), pipelined=stages > 1)
        grads = jax.jit(grads_fn)(params, rngs, frozen, {}, _batch(B=4))[0]
        return {path: np.asarray(g.get_value()) for path, g in nnx.to_flat_state(grads)
                if "layers" in path}

    def worst(got, ref):          # largest difference / largest element, over the layer weights
        return max(np.max(np.abs(got[k] - ref[k])) / np.max(np.abs(ref[k])) for k in ref)

    loop = layer_grads(1)
    assert worst(layer_grads(2), loop) < 1e-5
    cast = stack.compute_weights
    monkeypatch.setattr(pipeline, "compute_weights", lambda layers, _: cast(layers, jnp.bfloat16))
    assert worst(layer_grads(2), loop) > 1e-3            # the test sees the bf16 carry's rounding
