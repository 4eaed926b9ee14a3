"""``medjax.ops.attention`` dispatch: implementations, "auto" by the compile target, cuDNN
capability checks and the right-padding test that lets "auto" reach cuDNN during training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.ops import attention, attention_reference
from medjax.ops.attention import cudnn_supports, resolve_implementation, right_padding_lengths
from medjax.ops.target import compilable_platforms, target_platforms

from attention_checks import random_qkv, rel_err


def test_auto_is_xla_on_cpu():
    q, k, _, _ = random_qkv(0, 1, 8, 8, 4, 2, 64, jnp.float32)
    assert jax.default_backend() == "cpu"
    assert resolve_implementation(q, k, "auto") == "xla"


def test_unknown_implementation_is_rejected():
    q, k, v, _ = random_qkv(0, 1, 8, 8, 4, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(q, k, v, implementation="flash")


def test_pallas_dispatch_matches_reference_for_prefill_and_decode():
    q, k, v, _ = random_qkv(0, 2, 24, 24, 4, 2, 64, jnp.float32)
    kw = dict(causal=True, sliding_window=10)
    pallas = jax.jit(lambda q, k, v: attention(q, k, v, implementation="pallas", **kw))
    got = pallas(q, k, v)                                    # flash kernel
    assert rel_err(got, attention_reference(q, k, v, **kw)) <= 1e-5
    got = pallas(q[:, -1:], k, v)                            # decode kernel (T=1, S=24)
    assert rel_err(got, attention_reference(q[:, -1:], k, v, **kw)) <= 1e-5


def test_cudnn_capability_reasons():
    q, k, _, _ = random_qkv(0, 1, 8, 8, 4, 2, 64, jnp.bfloat16)
    assert cudnn_supports(q, k, causal=True) is None
    assert "bf16" in cudnn_supports(q.astype(jnp.float32), k, causal=True)
    assert "segment" in cudnn_supports(q, k, segment_ids=jnp.zeros((1, 8), jnp.int32))
    assert "positions" in cudnn_supports(q, k, q_positions=jnp.zeros((1, 8), jnp.int32))
    assert "T != S" in cudnn_supports(q[:, :1], k, causal=True)
    with pytest.raises(NotImplementedError, match="segment"):
        attention(q, k, k, segment_ids=jnp.zeros((1, 8), jnp.int32), implementation="cudnn")


def test_auto_on_gpu_picks_cudnn_or_checks_padding_at_run_time():
    q, k, _, _ = random_qkv(0, 1, 8, 8, 4, 2, 64, jnp.bfloat16)
    seg = jnp.ones((1, 8), jnp.int32)
    assert resolve_implementation(q, k, "auto", "cuda") == "cudnn"
    assert resolve_implementation(q, k, "auto", "cuda", segment_ids=seg,
                                  q_positions=seg) == "cudnn|pallas"
    assert resolve_implementation(q, k, "auto", "cuda", segment_ids=(seg, seg)) == "pallas"
    assert resolve_implementation(q.astype(jnp.float32), k, "auto", "cuda") == "pallas"
    assert resolve_implementation(q, k, "auto", "rocm") == "pallas"
    assert resolve_implementation(q, k, "auto", "tpu") == "pallas"
    assert resolve_implementation(q, k, "auto", "cpu") == "xla"


def test_right_padding_is_told_apart_from_packing():
    q, k, _, _ = random_qkv(0, 3, 6, 6, 4, 2, 64, jnp.bfloat16)
    arange = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (3, 6))
    right_padded = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    ok, lengths = right_padding_lengths(q, k, segment_ids=right_padded, q_positions=arange,
                                        kv_positions=arange)
    assert bool(ok) and lengths.tolist() == [4, 6, 1]
    ok, lengths = right_padding_lengths(q, k, segment_ids=right_padded, kv_lengths=jnp.asarray([3, 6, 6]))
    assert bool(ok) and lengths.tolist() == [3, 6, 1]
    packed = right_padded.at[1, 3:].set(2)                       # two examples in row 1
    restarted = arange.at[1, 3:].add(-3)
    left_padded = jnp.asarray([[0, 0, 1, 1, 1, 1]] * 3)
    empty_row = right_padded.at[2].set(0)
    for seg, pos in [(packed, arange), (right_padded, restarted), (left_padded, arange),
                     (empty_row, arange)]:
        ok, _ = right_padding_lengths(q, k, segment_ids=seg, q_positions=pos, kv_positions=pos)
        assert not bool(ok), (seg, pos)
    # positions only matter on real tokens: padding may carry anything
    ok, _ = right_padding_lengths(q, k, segment_ids=right_padded, q_positions=arange.at[0, 5].set(0))
    assert bool(ok)


def test_only_installed_platforms_are_traced():
    assert compilable_platforms()[0] == "cpu"
    with target_platforms("cpu", "tpu"):
        assert compilable_platforms() == ("cpu", "tpu")
    with pytest.raises(ValueError, match="gpu"):
        with target_platforms("gpu"):
            pass


@pytest.fixture
def fake_tpu_info(monkeypatch):
    """Mosaic asks the (absent) TPU for its generation while lowering: answer v5e."""
    from jax._src.pallas.mosaic import lowering, tpu_info
    info = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
    monkeypatch.setattr(tpu_info, "get_tpu_info", lambda *a, **k: info)
    monkeypatch.setattr(lowering.tpu_info, "get_tpu_info", lambda *a, **k: info)


def test_auto_follows_the_platform_it_is_lowered_for(fake_tpu_info):
    """One traced program; the lowering platform picks XLA (CPU), Mosaic (TPU) or Triton (GPU:
    cuDNN needs jaxlib's CUDA libraries to trace, absent here, so the Pallas kernel)."""
    q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    fwd = jax.jit(lambda q, k, v: attention(q, k, v, causal=True))
    with target_platforms("cpu", "tpu", "cuda"):
        traced = fwd.trace(q, kv, kv)
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    tpu = traced.lower(lowering_platforms=("tpu",)).as_text()
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "custom_call" not in cpu and "dot_general" in cpu
    assert tpu.count("tpu_custom_call") == 1 and "__gpu$xla.gpu.triton" not in tpu
    assert cuda.count("__gpu$xla.gpu.triton") == 1 and "tpu_custom_call" not in cuda


def test_kernels_run_per_shard_of_the_context_mesh(fake_tpu_info):
    """Custom calls cannot be partitioned by XLA: on a mesh the kernel runs per device shard
    (rows over data/fsdp/expert, heads over tensor)."""
    from jax.sharding import AxisType
    mesh = jax.sharding.AbstractMesh((2, 2, 2, 1), ("data", "fsdp", "tensor", "expert"),
                                     axis_types=(AxisType.Auto,) * 4)
    shapes = lambda B: (jax.ShapeDtypeStruct((B, 256, 4, 64), jnp.bfloat16),  # noqa: E731
                        *[jax.ShapeDtypeStruct((B, 256, 2, 64), jnp.bfloat16)] * 2,
                        jax.ShapeDtypeStruct((B, 256), jnp.int32))
    fwd = jax.jit(lambda q, k, v, seg: attention(q, k, v, segment_ids=seg))
    with target_platforms("cpu", "tpu"), jax.sharding.use_abstract_mesh(mesh):
        text = fwd.trace(*shapes(8)).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") == 1
        # the kernel sees one device's block: 8 rows / (data 2 x fsdp 2), 4 heads / tensor 2
        assert "tensor<2x2x256x64xbf16>" in text
        with pytest.raises(ValueError, match="cannot split"):
            fwd.trace(*shapes(2))


def test_mask_helpers_reexported():
    from medjax.ops import attention_mask
    q, k, _, _ = random_qkv(0, 1, 4, 6, 2, 2, 16, jnp.float32)
    mask = np.asarray(attention_mask(q, k, causal=True))[0]
    # Queries are aligned to the end of the keys: query t sits at position S - T + t.
    np.testing.assert_array_equal(mask, np.tril(np.ones((4, 6), bool), k=2))


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["right-padded->cudnn", "packed->pallas"])
def test_auto_on_gpu_matches_reference_for_training_calls(packed):
    """On a GPU, training's call (positions + segment ids) through "auto": right padding runs
    cuDNN with key lengths, packing the Pallas kernel; both equal the reference on real tokens
    (padding rows are never scored), output and gradients."""
    B, T, Hq, Hkv, D = 2, 256, 8, 2, 128
    q, k, v, ct = random_qkv(0, B, T, T, Hq, Hkv, D, jnp.bfloat16)
    lengths = np.asarray([200, 256])
    seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    if packed:
        seg[0, 100:200], pos[0, 100:200] = 2, np.arange(100)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos, jnp.int32)
    real = (seg > 0)[:, :, None, None]
    kw = dict(causal=True, segment_ids=seg, q_positions=pos, kv_positions=pos)
    ct = jnp.where(real, ct, 0)

    def run(impl):
        fn = lambda q, k, v: attention(q, k, v, implementation=impl, **kw)  # noqa: E731
        out, vjp = jax.vjp(jax.jit(fn), q, k, v)
        return (jnp.where(real, out, 0), *vjp(ct))
    for got, want in zip(run("auto"), run("xla")):
        assert rel_err(got, want) <= 2e-2


@pytest.mark.slow
@pytest.mark.multidevice
def test_kernel_per_shard_equals_reference_on_8_devices():
    """Executed, not just lowered: the Pallas kernel per shard of a (data 2, fsdp 2, tensor 2)
    mesh inside a step traced by ``train.step.on_mesh`` equals the reference (fwd + grads)."""
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from medjax.ops import attention_reference
    from medjax.train.step import on_mesh
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2, 1), ("data", "fsdp", "tensor", "expert"),
                axis_types=(AxisType.Auto,) * 4)
    q, k, v, ct = random_qkv(0, 4, 40, 40, 4, 2, 16, jnp.float32)
    seg = jnp.asarray(np.repeat([[1] * 25 + [2] * 10 + [0] * 5], 4, 0), jnp.int32)
    kw = dict(causal=True, sliding_window=12, segment_ids=seg)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * ct)
    pallas = lambda q, k, v: attention(q, k, v, implementation="pallas", **kw)  # noqa: E731
    ref = lambda q, k, v: attention_reference(q, k, v, **kw)  # noqa: E731
    rows = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    step = jax.jit(on_mesh(mesh, lambda q, k, v: (pallas(q, k, v), *jax.grad(loss(pallas), (0, 1, 2))(q, k, v))),
                   in_shardings=(rows,) * 3)
    text = step.lower(q, k, v).as_text()
    assert "shard_map" in text or "manual" in text, "kernel not run per shard"
    got = step(q, k, v)
    want = (ref(q, k, v), *jax.grad(loss(ref), (0, 1, 2))(q, k, v))
    assert max(rel_err(g, w) for g, w in zip(got, want)) <= 1e-5
