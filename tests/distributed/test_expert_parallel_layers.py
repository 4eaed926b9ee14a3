"""8 simulated CPU devices, mesh fsdp=2 × expert=4: the expert-parallel MoE dispatch
(medjax/models/moe_dispatch.py) against the one-device dispatch, forward and gradients, for
plain experts, LoRA on experts and router, QLoRA (nf4 + double quant, int8) and remat; and the
compiled step's collectives.

In-process on the session's 8 forced CPU devices (tests/conftest.py, marker ``multidevice``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from medjax import sharding
from medjax.config import MeshSection
from medjax.models import get_preset, init_decoder, moe_dispatch
from medjax.train.step import on_mesh
from tests.distributed import common, hlo_groups

pytestmark = [pytest.mark.multidevice, pytest.mark.slow]

MESH = dict(fsdp=2, expert=4)
EXPERT_AXIS = sharding.MESH_AXES.index("expert")


def _mesh():
    return sharding.make_mesh(MeshSection(preset="fsdp_ep", **MESH))


def _model(num_experts: int, variant: str, remat: str = "none"):
    cfg = dataclasses.replace(get_preset("tiny-mixtral"), num_experts=num_experts)
    model = init_decoder(cfg, seed=0)
    model.remat = remat
    wrt = nnx.Param
    if variant != "full":
        from medjax.lora import apply_lora
        targets = ["gate_proj", "up_proj", "down_proj", "block_sparse_moe.gate"]
        apply_lora(model, SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, targets=targets))
        rng = np.random.default_rng(3)   # non-zero B: the adapters change the output
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
            if path[-1] == "lora_b":
                var.set_value(jnp.asarray(rng.normal(0, 0.05, var.get_value().shape), jnp.float32))
        wrt = nnx.LoRAParam
    if variant in ("nf4", "int8"):
        from medjax.quant import quantize_model
        quantize_model(model, variant, block=32, double_quant=variant == "nf4")
    return model, wrt


def _value_and_grad(model, wrt, tokens, mesh):
    """``(loss, grads)`` of the causal-LM loss, compiled; with ``mesh``: params and batch placed
    as training places them and the step traced on the mesh (``training.step.on_mesh``)."""
    if mesh is not None:
        sharding.shard_model(model, mesh, sharding.rules_for("fsdp_ep"))
        tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def fn(params, rest, tokens):
        return jax.value_and_grad(lambda p: common.loss_fn(nnx.merge(graphdef, p, rest), tokens))(params)
    fn = on_mesh(mesh, fn) if mesh is not None else fn
    jitted = jax.jit(fn)
    return jitted(params, rest, tokens), jitted.lower(params, rest, tokens)


def _tokens(vocab):
    return jnp.asarray(common.batches(1, 8, vocab, seed=5)[0])


def test_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py gives the session 8 CPU devices"


def _assert_equals_one_device(model, wrt):
    """Loss and every trainable gradient: expert-parallel on the mesh == one device (1e-5).
    Returns the compiled EP program's HLO text."""
    tokens = _tokens(model.config.vocab_size)
    (ref_loss, ref_grads), _ = _value_and_grad(nnx.clone(model), wrt, tokens, None)
    (loss, grads), lowered = _value_and_grad(model, wrt, tokens, _mesh())
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=0, atol=1e-5)
    ref_flat, flat = nnx.to_flat_state(ref_grads), nnx.to_flat_state(grads)
    assert len(flat) == len(ref_flat) >= 4
    for (path, g), (_, r) in zip(flat, ref_flat):
        g, r = np.asarray(g.get_value()), np.asarray(r.get_value())
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * scale, err_msg=str(path))
        if "experts" in path:
            assert np.abs(r).max() > 0, path     # the experts are actually trained
    return lowered.compile().as_text()


@pytest.mark.parametrize("num_experts,variant,remat", [
    (4, "full", "none"), (8, "full", "full"), (8, "lora", "none"), (4, "nf4", "full"),
    (8, "int8", "none")])
def test_expert_parallel_equals_one_device(num_experts, variant, remat):
    model, wrt = _model(num_experts, variant, remat)
    assert "all-to-all" in _assert_equals_one_device(model, wrt)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name, axis_index_groups=None):
    """``jax.lax.ragged_all_to_all``'s documented semantics from dense all-to-alls (XLA:CPU has
    no ragged-all-to-all): slice ``d`` of ``operand`` lands on device ``d`` at the offset the
    sender chose, ``recv_sizes[s]`` rows from sender ``s``."""
    ep, M = input_offsets.shape[0], operand.shape[0]
    j = jnp.arange(M)
    src = jnp.clip(input_offsets[:, None] + j[None, :], 0, M - 1)
    sent = jnp.where((j[None, :] < send_sizes[:, None])[..., None], operand[src], 0)
    recv = jax.lax.all_to_all(sent.reshape(ep * M, -1), axis_name, 0, 0, tiled=True)
    at = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)   # [s]: where s writes
    dst = jnp.where(j[None, :] < recv_sizes[:, None], at[:, None] + j[None, :], output.shape[0])
    return output.at[dst.reshape(-1)].set(recv, mode="drop")


def _ragged_compiles_here() -> bool:
    mesh = jax.make_mesh((2,), ("e",), axis_types=(jax.sharding.AxisType.Auto,))
    one = jnp.ones((2,), jnp.int32)
    f = jax.shard_map(lambda x: jax.lax.ragged_all_to_all(
        x, jnp.zeros_like(x), one - 1, one, one - 1, one, axis_name="e"),
        mesh=mesh, in_specs=P("e"), out_specs=P("e"), check_vma=False)
    try:
        jax.jit(f)(jnp.ones((4, 2)))
        return True
    except Exception:   # noqa: BLE001  (XLA:CPU: UNIMPLEMENTED ragged-all-to-all)
        return False


def test_ragged_transport_equals_one_device(monkeypatch):
    """The GPU/TPU transport (``jax.lax.ragged_all_to_all``): its offsets and sizes checked on
    CPU against an emulation of the primitive's documented semantics where XLA:CPU lacks it."""
    monkeypatch.setattr(moe_dispatch, "transport_for", lambda platform: "ragged")
    if not _ragged_compiles_here():
        monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
    model, wrt = _model(8, "lora", "full")
    _assert_equals_one_device(model, wrt)


def test_hlo_has_all_to_all_and_no_expert_gather():
    """The compiled EP step moves tokens with all-to-alls and gathers no weight over `expert`;
    the GSPMD (one-device code on the same shardings) step does gather over `expert`, so the
    check can fail."""
    mesh = _mesh()
    model, wrt = _model(8, "full")
    tokens = _tokens(model.config.vocab_size)
    _, lowered = _value_and_grad(nnx.clone(model), wrt, tokens, mesh)
    hlo = lowered.compile().as_text()
    assert hlo_groups.collectives(hlo, "all-to-all")
    assert not hlo_groups.groups_spanning(hlo, "all-gather", mesh.devices.shape, EXPERT_AXIS)
    assert hlo_groups.collectives(hlo, "all-gather")          # the fsdp gathers are still there

    sharding.shard_model(model, mesh, sharding.rules_for("fsdp_ep"))   # GSPMD only, no EP
    graphdef, params, rest = nnx.split(model, wrt, ...)
    gspmd = jax.jit(jax.grad(lambda p, r, t: common.loss_fn(nnx.merge(graphdef, p, r), t)))
    hlo = gspmd.lower(params, rest, jax.device_put(tokens, sharding.batch_sharding(mesh))).compile().as_text()
    assert hlo_groups.groups_spanning(hlo, "all-gather", mesh.devices.shape, EXPERT_AXIS)


def test_planner_all_to_all_bytes_match_the_compiled_forward():
    """``moe_dispatch.all_to_all_bytes`` (what the planner prints) == the bytes of the rows the
    compiled forward's all-to-alls move off each device (padded transport, the CPU's)."""
    mesh = _mesh()
    model, wrt = _model(8, "full")
    cfg = model.config
    tokens = jax.device_put(_tokens(cfg.vocab_size), sharding.batch_sharding(mesh))
    sharding.shard_model(model, mesh, sharding.rules_for("fsdp_ep"))
    graphdef, params, rest = nnx.split(model, wrt, ...)
    forward = jax.jit(on_mesh(mesh, lambda p, r, t: common.loss_fn(nnx.merge(graphdef, p, r), t)))
    hlo = forward.lower(params, rest, tokens).compile().as_text()
    moved = 0
    for line in hlo_groups.collectives(hlo, "all-to-all"):
        result = line.split(" all-to-all", 1)[0]
        for dims in re.findall(r"f32\[([\d,]+)\]", result):
            shape = [int(d) for d in dims.split(",")]
            moved += math.prod(shape) * 4 if shape[-1] == cfg.hidden_size else 0
    ep = MESH["expert"]
    local_tokens = tokens.shape[0] * (tokens.shape[1] - 1) // mesh.size
    expected = cfg.num_layers * moe_dispatch.all_to_all_bytes(
        local_tokens, cfg.hidden_size, cfg.num_experts_per_tok, cfg.num_experts, ep, 4, "padded")
    assert moved > 0 and moved * (ep - 1) / ep == expected
