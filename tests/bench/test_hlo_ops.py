"""``medjax.bench._hlo_ops``: per-op FLOPs, bytes and seconds of a compiled step's HLO text, on a
hand-written module in libtpu's printed form (no jax, no libtpu)."""
from medjax.bench import _hlo_ops as hlo_ops

RATES = hlo_ops.LIBTPU_RATES["v5p"]

# q-projection as GSPMD wrote it before constrain_rows: heads as a spatial dim of a convolution
# over a padded window (one valid tap per output); a plain dot with libtpu's cycle estimate; a
# Mosaic kernel with and without a cost estimate; a VMEM prefetch; an async all-gather wrapped
# in a fusion; a [T, 1] fp32 array padded to 128 lanes; a kernel whose config string holds a
# newline (levanter's splash kernels: the next line starts with "}", which does not end ENTRY).
MODULE = """HloModule jit_step, entry_computation_layout={()}

%fused_conv (p0: bf16[4,4096,1024,1], p1: bf16[32,128,1024,1]) -> bf16[4,4096,32,128] {
  %p0 = bf16[4,4096,1024,1]{1,2,3,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[32,128,1024,1]{2,1,0,3:T(8,128)(2,1)} parameter(1)
  ROOT %convolution.1 = bf16[4,4096,32,128]{3,1,2,0:T(8,128)(2,1)} convolution(%p0, %p1), window={size=1x32 pad=0_0x31_31 rhs_reversal=0x1}, dim_labels=0bf1_1oi0->0b1f
}

%fused_dot (q0: bf16[4096,4096], q1: bf16[4096,11008]) -> bf16[4096,11008] {
  %q0 = bf16[4096,4096]{1,0:T(8,128)(2,1)} parameter(0)
  %q1 = bf16[4096,11008]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  ROOT %dot.2 = bf16[4096,11008]{1,0:T(8,128)(2,1)} dot(%q0, %q1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%gather_fusion (g0: bf16[1024,4096]) -> bf16[4096,4096] {
  %g0 = bf16[1024,4096]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %all-gather.3 = bf16[4096,4096]{1,0:T(8,128)(2,1)} all-gather(%g0), dimensions={0}
}

ENTRY %main (a: bf16[4,4096,1024,1], w: bf16[32,128,1024,1], x: bf16[4096,4096], u: bf16[4096,11008], s: bf16[1024,4096], l: f32[4096,1]) -> bf16[4096,11008] {
  %a = bf16[4,4096,1024,1]{1,2,3,0:T(8,128)(2,1)} parameter(0)
  %w = bf16[32,128,1024,1]{2,1,0,3:T(8,128)(2,1)} parameter(1)
  %x = bf16[4096,4096]{1,0:T(8,128)(2,1)} parameter(2)
  %u = bf16[4096,11008]{1,0:T(8,128)(2,1)} parameter(3)
  %s = bf16[1024,4096]{1,0:T(8,128)(2,1)} parameter(4)
  %l = f32[4096,1]{1,0:T(8,128)} parameter(5)
  %fusion.1 = bf16[4,4096,32,128]{3,1,2,0:T(8,128)(2,1)} fusion(%a, %w), kind=kOutput, calls=%fused_conv
  %copy-start.1 = (bf16[4096,11008]{1,0:T(8,128)(2,1)S(1)}, bf16[4096,11008]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%u)
  %copy-done.1 = bf16[4096,11008]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start.1)
  %fusion.2 = bf16[4096,11008]{1,0:T(8,128)(2,1)} fusion(%x, %copy-done.1), kind=kOutput, calls=%fused_dot, backend_config={"window_config":{"estimated_cycles":"3500000"}}
  %medjax_flash_fwd.1 = (bf16[1,32,4096,128]{3,2,1,0:T(8,128)(2,1)}, f32[1,32,4096,1]{3,2,1,0:T(8,128)}) custom-call(%x, %x, %x), custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"body":"TUzv","cost_estimate":{"flops":"394000000000","transcendentals":"268500992","bytes_accessed":"134742016","remote_bytes_transferred":"0"}}}
  %splash_mha_dq_segmented_block_q_512.1 = bf16[32,4096,128]{2,1,0:T(8,128)(2,1)} custom-call(%x, %x), custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"body":"TUzv"},"xprof_metadata":"{\"block_q\": 512
}"}, metadata={op_name="splash"}
  %fusion.3 = bf16[4096,4096]{1,0:T(8,128)(2,1)} fusion(%s), kind=kCustom, calls=%gather_fusion
  %neg.1 = f32[4096,1]{1,0:T(8,128)} negate(%l)
  ROOT %tuple.1 = (bf16[4096,11008]) tuple(%fusion.2)
}
"""


def _by_name(ops):
    return {op.name: op for op in ops}


def test_flops_bytes_and_seconds_per_op():
    ops = _by_name(hlo_ops.op_costs(MODULE, RATES))
    assert set(ops) == {"fusion.1", "copy-start.1", "fusion.2", "medjax_flash_fwd.1",
                        "splash_mha_dq_segmented_block_q_512.1", "fusion.3", "neg.1"}
    # the padded window: one valid tap per output, so 2 * out * 1024, not x32
    assert ops["fusion.1"].flops == 2 * 4 * 4096 * 32 * 128 * 1024
    assert ops["fusion.1"].label == "matmul 4x4096x1024 . 32x128x1024"
    dot = ops["fusion.2"]
    assert dot.flops == 2 * 4096 * 4096 * 11008 and dot.label == "matmul 4096x4096 . 4096x11008"
    assert dot.bytes == 2 * (4096 * 4096 + 4096 * 11008)      # the VMEM operand counts 0
    assert dot.seconds == 3500000 / RATES["clock"]            # libtpu's own cycles win
    assert ops["copy-start.1"].bytes == 2 * 4096 * 11008
    kernel = ops["medjax_flash_fwd.1"]
    assert kernel.flops == 394e9 and abs(kernel.seconds - 1e-3) < 1e-12 and not kernel.undeclared
    bare = ops["splash_mha_dq_segmented_block_q_512.1"]
    assert bare.undeclared and bare.flops == 0 and bare.seconds == 0
    assert bare.label == "kernel splash_mha_dq_segmented (no cost declared)"
    gather = ops["fusion.3"]
    assert gather.collective and gather.collective_bytes == 2 * 4096 * 4096 and gather.seconds == 0
    assert ops["neg.1"].bytes == 2 * 4 * 4096 * 128            # [T, 1] fp32 padded to 128 lanes


def test_totals_group_and_imputed_kernels():
    ops = hlo_ops.op_costs(MODULE, RATES)
    t = hlo_ops.totals(ops)
    assert t["kernels"] == 2 and t["undeclared_kernels"] == 1 and t["ops"] == 7
    groups = hlo_ops.group(ops)
    assert groups[0]["label"] == "matmul 4096x4096 . 4096x11008"        # the costliest first
    reference = [op for op in ops if op.name != "splash_mha_dq_segmented_block_q_512.1"]
    assert hlo_ops.impute_kernels(ops, reference, RATES)["missing"] == 1   # no dq to copy
    dq = hlo_ops.Op("medjax_flash_bwd_dq.1", "custom-call", "kernel medjax_flash_bwd_dq",
                    flops=788e9, bytes=1e6)
    imputed = hlo_ops.impute_kernels(ops, [*reference, dq], RATES)
    assert imputed == {"flops": 788e9, "seconds": 2e-3, "kernels": 1, "missing": 0}
    assert [hlo_ops.kernel_kind(x) for x in ("kernel medjax_flash_bwd_dkdv", "kernel splash_mha_dkv",
                                             "kernel splash_mha_fwd_x", "matmul 1 . 2")] == \
        ["dkv", "dkv", "fwd", None]
    text = hlo_ops.top_table({"side": {"groups": groups, "totals": t}}, 1)
    assert "| side | matmul 4096x4096 . 4096x11008 | 1 |" in text
    assert "kernel splash_mha_dq_segmented (no cost declared)" in text     # kernels always listed
    assert "| side | all ops | 7 |" in text


# What libtpu charges, asked of libtpu itself (``.venv-tpu``): a Mosaic call declaring one cost
# at a time, none, and all three; a bf16 matmul whose per-op estimate is libtpu's cycles.
LIBTPU_PROBE = """
import json, re, sys
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import SingleDeviceSharding
from medjax.ops.pallas import tpu_compile
device = tpu_compile.topology_devices("v5p:2x2x1")[0]
x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=SingleDeviceSharding(device))

def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

def call(cost):
    spec = pl.BlockSpec((256, 4096), lambda i: (i, 0))
    return lambda a: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(a.shape, a.dtype), grid=(16,),
                                    in_specs=[spec], out_specs=spec, cost_estimate=cost)(a)

out = {}
with tpu_compile.target_chip("v5p"):
    for name, ftb in {"flops": (1e12, 0, 0), "bytes": (0, 0, 2.76e9), "transcendentals": (0, 1e9, 0),
                      "all": (4.59e11, 1e9, 2.76e9), "none": None}.items():
        cost = ftb and pl.CostEstimate(flops=int(ftb[0]), transcendentals=int(ftb[1]), bytes_accessed=int(ftb[2]))
        out[name] = jax.jit(call(cost)).lower(x).compile().cost_analysis().get("optimal_seconds", 0.0)
    matmul = jax.jit(lambda a, b: a @ b).lower(x, x).compile()
    out["matmul_text"] = matmul.as_text()
    out["matmul"] = matmul.cost_analysis()["optimal_seconds"]
print(json.dumps(out))
"""


def test_libtpu_rates_are_what_libtpu_charges():
    """``LIBTPU_RATES`` re-measured: libtpu's optimal_seconds of a Mosaic call is the largest of its
    declared FLOPs, bytes and transcendentals over these rates (0 s when it declares none), and
    a matmul's estimated_cycles at the clock come within 25% of its optimal_seconds."""
    import json
    import subprocess

    import pytest

    from medjax.ops.pallas import tpu_compile
    if not tpu_compile.TPU_VENV_PYTHON.exists():
        pytest.skip("no .venv-tpu (libtpu): `make tpu-venv`")
    proc = subprocess.run([str(tpu_compile.TPU_VENV_PYTHON), "-c", LIBTPU_PROBE], capture_output=True,
                          text=True, env=tpu_compile.compile_only_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["none"] == 0.0
    for name, expected in {"flops": 1e12 / RATES["flops"], "bytes": 2.76e9 / RATES["bytes"],
                           "transcendentals": 1e9 / RATES["transcendentals"],
                           "all": max(4.59e11 / RATES["flops"], 2.76e9 / RATES["bytes"],
                                      1e9 / RATES["transcendentals"])}.items():
        assert abs(got[name] / expected - 1) < 0.01, (name, got[name], expected)
    ops = hlo_ops.op_costs(got["matmul_text"], RATES)
    (dot,) = [op for op in ops if op.label.startswith("matmul")]
    assert dot.flops == 2 * 4096 ** 3 and dot.cycles
    assert abs(dot.seconds / got["matmul"] - 1) < 0.25, (dot.seconds, got["matmul"])
