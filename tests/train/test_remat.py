"""Activation checkpointing (``model.remat``) changes memory, never numbers: for every kind of
variable that passes through a rematerialised layer — trainable params, frozen LoRA bases,
quantized codes, dropout/NEFTune RNG state, a DPO reference — the loss and the gradients of the
trainable variables with remat on equal those with remat off."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax.config import LoraSection
from medjax.lora import apply_lora
from medjax.models import get_preset, init_decoder
from medjax.quant import quantize_model
from medjax.train import step as S
from medjax.train.objectives import DPO, CausalLM
from medjax.train.neftune import attach_neftune

POLICIES = ("full", "dots_saveable")
MIXTRAL_TARGETS = ("q_proj", "v_proj", "o_proj", "experts", "block_sparse_moe.gate")


def _batch(B=4, T=16, seed=0, prefix=""):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 512, (B, T + 1))
    lengths = rng.integers(T // 2, T + 1, B)
    seg = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    mask = seg * (np.arange(T)[None, :] >= 3)
    b = {"input_ids": ids[:, :-1] * seg, "targets": ids[:, 1:] * seg,
         "positions": np.broadcast_to(np.arange(T), (B, T)), "segment_ids": seg,
         "loss_mask": mask.astype(np.float32)}
    return {prefix + k: jnp.asarray(v) for k, v in b.items()}


def _model(preset, *, lora=None, quantize=None, neftune=0.0):
    model = init_decoder(get_preset(preset), seed=0, attention_impl="xla")
    if lora is not None:
        apply_lora(model, LoraSection(enabled=True, rank=4, targets=lora, dropout=0.1, quantize=quantize))
        # non-zero B so that every adapter (and the gradient of A) takes part
        leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
        keys = jax.random.split(jax.random.key(3), len(leaves))
        nnx.update(model, jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                                       for x, k in zip(leaves, keys)]))
        if quantize:
            quantize_model(model, quantize, block=32)
    attach_neftune(model, neftune, seed=0)
    return model


def _split_each_policy(model, lora, policy):
    """``{"none" | policy: (graphdef, params, rngs, frozen)}`` of the same model and weights."""
    out = {}
    for p in ("none", policy):
        model.remat = p
        out[p] = S.split_model(model, lora)
    return out


def _assert_same(results, policy):
    (loss0, grads0) = results["none"]
    loss, grads = results[policy]
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5, err_msg=policy)
    flat0, flat = nnx.to_flat_state(grads0), nnx.to_flat_state(grads)
    assert len(flat0) == len(flat) > 0
    for (k0, g0), (k, g) in zip(flat0, flat):
        assert k0 == k
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(g0.get_value()),
                                   rtol=1e-5, atol=1e-5, err_msg=f"{policy} {k}")
    assert any(float(jnp.abs(g.get_value()).max()) > 0 for _, g in flat)


CAUSAL_CASES = {
    "full_finetune": dict(preset="tiny-llama2"),
    "full_finetune_neftune_accum": dict(preset="tiny-mixtral", neftune=5.0, grad_accum=2),
    "lora_linear_experts_router": dict(preset="tiny-mixtral", lora=MIXTRAL_TARGETS, grad_accum=2),
    "qlora_nf4": dict(preset="tiny-mixtral", lora=MIXTRAL_TARGETS, quantize="nf4"),
    "qlora_int8_accum": dict(preset="tiny-llama2", lora=("q_proj", "v_proj", "down_proj"),
                             quantize="int8", grad_accum=2),
}


# dots_saveable differs from full only in what the policy saves: the slow run covers it
POLICY_PARAMS = [pytest.param("full"), pytest.param("dots_saveable", marks=pytest.mark.slow)]


@pytest.mark.parametrize("policy", POLICY_PARAMS)
@pytest.mark.parametrize("case", list(CAUSAL_CASES))
def test_remat_keeps_causal_lm_loss_and_grads(case, policy):
    kw = dict(CAUSAL_CASES[case])
    grad_accum = kw.pop("grad_accum", 1)
    lora = kw.get("lora") is not None
    model = _model(**kw)
    batch = _batch()
    run = jax.jit(S.accumulate_grads, static_argnames=("graphdef", "grad_accum", "objective"))
    results = {}
    for policy, (graphdef, params, rngs, frozen) in _split_each_policy(model, lora, policy).items():
        grads, _, metrics = run(params, rngs, frozen, {}, batch, graphdef=graphdef,
                                grad_accum=grad_accum, objective=CausalLM(aux_coef=0.02))
        results[policy] = (metrics["loss"] + 0.02 * metrics["aux_loss"], grads)
    _assert_same(results, policy)


@pytest.mark.parametrize("policy", POLICY_PARAMS)
@pytest.mark.parametrize("reference", ["adapters_off", "frozen_copy"])
def test_remat_keeps_dpo_loss_and_grads(reference, policy):
    lora = reference == "adapters_off"
    model = _model("tiny-llama2", lora=("q_proj", "v_proj", "down_proj") if lora else None)
    batch = {**_batch(seed=1, prefix="chosen_"), **_batch(seed=2, prefix="rejected_")}
    results = {}
    for policy, (graphdef, params, rngs, frozen) in _split_each_policy(model, lora, policy).items():
        # the frozen-copy reference: initial weights, here perturbed so it differs from the policy
        ref = (jax.tree.map(lambda x: x * 0.9, params) if reference == "frozen_copy" else {})
        # through the product step: the DPO objective under grad accumulation (lax.scan)
        grads, _, metrics = jax.jit(S.accumulate_grads, static_argnames=("graphdef", "grad_accum", "objective"))(
            params, rngs, frozen, ref, batch, graphdef=graphdef, grad_accum=2,
            objective=DPO(beta=0.5, reference_mode=reference))
        results[policy] = (metrics["loss"], grads)
    _assert_same(results, policy)


def test_unknown_remat_policy_is_a_config_error_naming_the_policies():
    from medjax.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="model.remat.*none.*full.*dots_saveable"):
        load_config(None, ["model.remat=everything"])


@pytest.mark.parametrize("lora", [None, ("q_proj", "v_proj")])
def test_each_remat_layer_finishes_its_weight_gradients_before_the_layer_below(lora):
    """``decoder.finish_gradients_first``: in the backward of every rematerialised layer above
    the first, the gradient flowing to the layer below passes an ``optimization_barrier`` with
    one scalar (sum of squares) per trainable weight of that layer — so the weight gradients are
    formed inside the layer's backward (libtpu otherwise sinks some to the step's end:
    docs/PERFORMANCE.md). Frozen weights (LoRA's bases) are not tied. Values: the tests above."""
    model = _model("tiny-llama2", lora=lora)
    model.remat = "full"
    graphdef, params, rngs, frozen = S.split_model(model, lora is not None)
    hlo = jax.jit(S.accumulate_grads, static_argnames=("graphdef", "grad_accum", "objective")).lower(
        params, rngs, frozen, {}, _batch(), graphdef=graphdef, grad_accum=1,
        objective=CausalLM()).as_text()
    L = model.config.num_layers
    per_layer = sum("layers" in path for path, _ in nnx.to_flat_state(params)) // L
    B, T, H = 4, 16, model.config.hidden_size
    tie = ", ".join(["tensor<f32>"] * per_layer + [f"tensor<{B}x{T}x{H}xf32>"])
    ties = [line for line in hlo.splitlines() if "stablehlo.optimization_barrier" in line
            and line.rstrip().endswith(": " + tie)]
    # the first layer's too where the embedding is trained (its gradient is that layer's input's)
    assert len(ties) == (L if lora is None else L - 1), (per_layer, tie)
