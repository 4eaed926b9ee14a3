"""int8 / nf4 quantization: error bounds, optimal rounding, QLoRA forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax import quant
from medjax.config import LoraSection
from medjax.lora import apply_lora
from medjax.models import get_preset, init_decoder

W = jax.random.normal(jax.random.key(0), (3, 256, 40)) * 0.02 + 0.001


def test_int8_error_within_half_a_step_per_channel():
    spec, arrays = quant.quantize(W, "int8", dtype=jnp.float32)
    err = np.abs(np.asarray(quant.dequantize(spec, arrays)) - np.asarray(W))
    step = np.abs(np.asarray(W)).max(axis=-2, keepdims=True) / 127
    assert arrays["codes"].dtype == jnp.int8
    assert np.all(err <= step / 2 + 1e-7)


def test_nf4_rounds_to_the_nearest_level_of_each_block():
    spec, arrays = quant.quantize(W, "nf4", block=64, dtype=jnp.float32)
    got = np.asarray(quant.dequantize(spec, arrays))
    # numpy reference: per block of 64 `in` rows per column, absmax scaling, nearest NF4 level
    w = np.asarray(W).reshape(3, 4, 64, 40)
    absmax = np.abs(w).max(axis=2, keepdims=True)
    levels = quant.NF4_LEVELS
    nearest = levels[np.argmin(np.abs(w[..., None] / absmax[..., None] - levels), axis=-1)]
    ref = (nearest * absmax).reshape(W.shape)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
    # the format's bound: half the widest gap between adjacent levels, times the block absmax
    err = np.abs(got - np.asarray(W)).reshape(3, 4, 64, 40)
    assert np.all(err <= quant.codec.NF4_MAX_HALF_GAP * absmax + 1e-7)
    assert arrays["codes"].dtype == jnp.uint8 and arrays["codes"].shape == (3, 128, 40)


def test_nf4_double_quant_scales_error_and_bytes():
    spec, plain = quant.quantize(W, "nf4", block=64, dtype=jnp.float32)
    spec_dq, dq = quant.quantize(W, "nf4", block=64, double_quant=True, dtype=jnp.float32)
    scales = np.asarray(plain["scales"])
    scales_dq = np.asarray(quant.codec._nf4_scales(spec_dq, dq))
    # second-level int8 codes: at most half a step of (max |scale - mean| / 127) per scale
    step = np.abs(scales - scales.mean()).max() / 127
    assert np.all(np.abs(scales_dq - scales) <= step / 2 + 1e-8)
    err = np.abs(np.asarray(quant.dequantize(spec_dq, dq)) - np.asarray(W)).reshape(3, 4, 64, 40)
    bound = quant.codec.NF4_MAX_HALF_GAP * scales[:, :, None, :] + step / 2 + 1e-7
    assert np.all(err <= bound)
    n = W.size
    assert quant.storage_bytes(plain) / n == pytest.approx(0.5 + 4 / 64)
    assert quant.storage_bytes(dq) / n < 0.5 + 1.2 / 64     # ~0.516 at real sizes


_BUILT = {}


def _lora_model(preset, targets):
    """A fresh copy of a tiny decoder + LoRA with non-zero adapters (built once per preset)."""
    if preset not in _BUILT:
        model = init_decoder(get_preset(preset), seed=0)
        apply_lora(model, LoraSection(enabled=True, rank=4, alpha=8, targets=targets), seed=0)
        state = nnx.state(model, nnx.LoRAParam)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        nnx.update(model, jax.tree.unflatten(treedef, noisy))    # B != 0: adapters contribute
        _BUILT[preset] = model
    return nnx.clone(_BUILT[preset])


def _quantize(model, fmt, **kw):
    return model, quant.quantize_model(model, fmt, **kw)


def _dequantize(model):
    return quant.dequantize_model(nnx.clone(model))


MIXTRAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "block_sparse_moe.gate")
CASES = [("tiny-llama2", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
         ("tiny-mixtral", MIXTRAL_TARGETS)]


@nnx.jit
def _logits(model, ids):
    return model(ids)


def _loss(model, ids):
    logits = model(ids[:, :-1])
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))


@pytest.mark.parametrize("preset,targets,fmt", [CASES[0] + ("int8",), CASES[0] + ("nf4",),
                                                CASES[1] + ("int8",), CASES[1] + ("nf4",)])
def test_qlora_forward_close_to_lora_and_exact_vs_dequantized(preset, targets, fmt):
    ids = jax.random.randint(jax.random.key(2), (2, 24), 0, 512)
    model = _lora_model(preset, targets)
    ref_logits, ref_loss = _logits(model, ids), nnx.jit(_loss)(model, ids)
    model, report = _quantize(model, fmt, block=64, double_quant=(fmt == "nf4"))
    wrapped = {p for p, *_ in report.tensors}
    assert any(p.endswith("q_proj.base") for p in wrapped)
    if preset == "tiny-mixtral":   # every expert stack and the router are quantized under LoRA
        assert any(p.endswith("experts.base") for p in wrapped)
        assert any(p.endswith("block_sparse_moe.gate.base") for p in wrapped)
    if fmt == "nf4":   # bytes/param reported at load; storage is never a trainable Param
        assert 0.5 < report.quantized_bytes_per_param < 0.5 + 4 / 64 and "bytes/param" in report.summary()
        stored = jax.tree.leaves(nnx.state(model, quant.QuantizedArray))
        float_elems = sum(x.size for x in stored if jnp.issubdtype(x.dtype, jnp.floating))
        assert float_elems * 64 <= report.quantized_params          # codes are ints, scales few
        assert not jax.tree.leaves(nnx.state(model, nnx.Param).filter(
            lambda path, v: any(str(p) == "base" for p in path) and v.get_value().ndim >= 2))
    q_logits, q_loss = _logits(model, ids), nnx.jit(_loss)(model, ids)
    rel_logits = float(jnp.linalg.norm(q_logits - ref_logits) / jnp.linalg.norm(ref_logits))
    rel_loss = abs(float(q_loss - ref_loss)) / float(ref_loss)
    if fmt == "int8":
        assert rel_logits < 0.02, rel_logits
    else:
        # nf4 rounds each weight by up to 15% of its block absmax: logits move ~10% on random
        # tiny models, the LM loss stays within 2%
        assert rel_logits < 0.2, rel_logits
    assert rel_loss < 0.02, rel_loss
    # on-the-fly dequantization computes exactly what the dequantized weights compute
    plain = _dequantize(model)
    np.testing.assert_allclose(np.asarray(_logits(plain, ids)), np.asarray(q_logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,targets", CASES)
def test_qlora_adapter_grads_equal_grads_through_the_dequantized_base(preset, targets):
    ids = jax.random.randint(jax.random.key(3), (2, 16), 0, 512)
    model = _lora_model(preset, targets)
    model, _ = _quantize(model, "nf4", block=32)
    plain = _dequantize(model)
    grad = nnx.jit(lambda m: nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m, ids))
    g_q = dict(nnx.to_flat_state(grad(model)))
    g_p = dict(nnx.to_flat_state(grad(plain)))
    assert g_q.keys() == g_p.keys() and len(g_q) > 0
    for k in g_q:
        np.testing.assert_allclose(np.asarray(g_q[k].get_value()), np.asarray(g_p[k].get_value()),
                                   rtol=2e-4, atol=1e-6, err_msg=str(k))


def test_quantize_errors():
    with pytest.raises(ValueError, match="format"):
        quant.quantize(W, "int4")
    with pytest.raises(ValueError, match="even"):
        quant.quantize(jnp.ones((3, 4)), "nf4")


@pytest.mark.parametrize("fmt,double_quant,n_out", [("int8", False, 40), ("nf4", False, 40),
                                                    ("nf4", True, 40), ("nf4", True, 7)])
def test_quantized_groups_dequantize_one_expert_inside_the_grouped_matmul(fmt, double_quant, n_out):
    """QLoRA experts reach ``grouped_matmul`` as codes (``QuantizedGroups``), each expert
    dequantized inside the loop: equal to the whole stack dequantized at once, forward and dx.
    Double quant: 160 scales per expert are grouped per expert; 28 (n_out=7) have no divisor
    >= 32, so they are grouped flat and experts straddle the 256-scale groups."""
    from medjax.ops.grouped_matmul import grouped_matmul
    E, n_in = 3, 64
    w = jax.random.normal(jax.random.key(5), (E, n_in, n_out))
    spec, arrays = quant.quantize(w, fmt, block=16, double_quant=double_quant, dtype=jnp.float32)
    groups = quant.QuantizedGroups(spec, arrays)
    dense = quant.dequantize(spec, arrays, jnp.float32)
    for g in range(E):
        one = jax.jit(groups.group, static_argnums=1)(g, jnp.float32)    # (fused FMA: 1 ulp)
        np.testing.assert_allclose(np.asarray(one), np.asarray(dense[g]), rtol=1e-6, atol=1e-7)
    sizes = jnp.array([7, 0, 12], jnp.int32)
    x = jax.random.normal(jax.random.key(6), (19, n_in))
    ct = jax.random.normal(jax.random.key(7), (19, n_out))

    def loss(x, w):
        y = grouped_matmul(x, w, sizes, block_rows=4)
        return jnp.sum(y * ct), y

    (_, y_q), dx_q = jax.jit(jax.value_and_grad(loss, has_aux=True))(x, groups)
    (_, y_d), dx_d = jax.jit(jax.value_and_grad(loss, has_aux=True))(x, dense)
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(y_d), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx_q), np.asarray(dx_d), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_bimedix_step_compiled_for_h100_holds_no_dequantized_expert_stack():
    """BiMediX's real train step with Mixtral-8x7B cut to 2 layers, compiled for a compile-only
    H100 (``.venv-cuda``; ~3-4 min here). The nf4 experts are dequantized one expert at a time
    inside the grouped matmul: XLA's temporaries were 3.61 GiB; 8.30 GiB when each projection's
    whole ``[8, 4096, 14336]`` stack was dequantized at once (XLA kept such copies across the
    micro-batch loop; 59 GiB of temporaries at 32 layers, docs/SCALE.md)."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    python = root / ".venv-cuda" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no {python}: `make cuda-venv` installs the compile-only CUDA compiler")
    res = subprocess.run([str(python), "tests/compile_only/qlora_moe_h100_check.py", "2"], cwd=root,
                         env={**os.environ, "JAX_PLATFORMS": "cpu",
                              "PYTHONPATH": str(root)},
                         capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert lines, res.stdout[-2000:] + res.stderr[-3000:]
    r = json.loads(lines[-1])
    assert r["temp"] < 5 * 2 ** 30, r


@pytest.mark.parametrize("preset,targets,fmt,double_quant,scan", [
    CASES[0] + ("int8", False, False), CASES[0] + ("nf4", True, True),
    CASES[1] + ("nf4", True, True), CASES[1] + ("int8", False, True)])
def test_export_merges_each_quantized_weight_in_one_pass_as_dequantize_then_merge(
        preset, targets, fmt, double_quant, scan):
    """``plain_model`` (export, eval of a run) dequantizes each weight and adds ``scale * A @ B``
    one matrix at a time; it must equal dequantizing the whole model to the compute dtype, then
    merging — the weights the QLoRA forward used plus the adapters. bf16 compute, so the rounding
    of the dequantized base to bf16 before the fp32 sum is checked too."""
    from medjax.lora import lora_modules, merge_lora, strip_lora
    from medjax.train.setup import plain_model
    model = init_decoder(get_preset(preset), seed=0, scan_layers=scan, dtype=jnp.bfloat16,
                         param_dtype=jnp.bfloat16)
    apply_lora(model, LoraSection(enabled=True, rank=4, alpha=8, targets=targets), seed=0)
    state = nnx.state(model, nnx.LoRAParam)
    noisy = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), state)
    nnx.update(model, noisy)
    quant.quantize_model(model, fmt, block=64, double_quant=double_quant)
    want = strip_lora(merge_lora(quant.dequantize_model(nnx.clone(model))))
    got = plain_model(model)                                   # keep=True: model left quantized
    assert not lora_modules(got) and lora_modules(model)
    assert jax.tree.leaves(nnx.state(model, quant.QuantizedArray))
    want_flat, got_flat = nnx.to_flat_state(nnx.state(want)), nnx.to_flat_state(nnx.state(got))
    assert [k for k, _ in want_flat] == [k for k, _ in got_flat]
    for (key, w), (_, g) in zip(want_flat, got_flat):
        w, g = w.get_value(), g.get_value()
        assert w.dtype == g.dtype and w.shape == g.shape, key
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=1e-2, atol=1e-6, err_msg=str(key))
        # bf16 output: equal except where the fp32 sums differ in their last bits and round apart
        assert np.mean(np.asarray(g) != np.asarray(w)) < 1e-3, key
