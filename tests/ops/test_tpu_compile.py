"""The real TPU compiler (XLA:TPU + Mosaic, from libtpu) accepts the Pallas kernels at 4k-32k.

Runs the product command ``python -m medjax.bench attention --compile-only tpu --cases ci``
once per chip (v5p and v6e, in parallel) with ``.venv-tpu``'s Python, which has libtpu; the main
venv never does. Cases: B=1, Hq/Hkv=32/8, D=128, bf16, causal T=4096 and T=32768, packed
segments at T=4096, sliding window at T=32768 (forward + backward each), and decode of one
token against a 32k cache. Each must compile, contain the Mosaic kernels in the compiled HLO
(``tpu_custom_call``: the real path, not an XLA fallback), fit the chip's default scoped VMEM,
and carry a cost estimate (the compiled cost analysis counts at least the forward's FLOPs).
"""
import json
import subprocess

import numpy as np
import pytest

from medjax.ops.pallas import tpu_compile
from medjax.bench._attention_tpu import CI, WINDOW, packed_segments

CHIPS = ("v5p", "v6e")
pytestmark = pytest.mark.skipif(
    not tpu_compile.TPU_VENV_PYTHON.exists(),
    reason=f"no {tpu_compile.TPU_VENV_PYTHON} (libtpu lives only there): run `make tpu-venv`")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("tpu_compile")
    procs = {}
    for chip in CHIPS:
        cmd = [str(tpu_compile.TPU_VENV_PYTHON), "-m", "medjax.bench", "attention",
               "--compile-only", "tpu", "--cases", "ci", "--chips", chip,
               "--json", str(out / f"{chip}.json")]
        procs[chip] = subprocess.Popen(cmd, env=tpu_compile.compile_only_env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs["oom"] = subprocess.Popen(
        [str(tpu_compile.TPU_VENV_PYTHON), "-c", OVERSIZED_BLOCKS, str(out / "oom.json")],
        env=tpu_compile.compile_only_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    rows = {}
    for chip, proc in procs.items():
        if chip == "oom":
            continue
        log, _ = proc.communicate(timeout=900)
        path = out / f"{chip}.json"
        assert path.exists(), f"{chip}: compile run wrote no results:\n{log[-3000:]}"
        for r in json.loads(path.read_text())["rows"]:
            rows[(chip, r["T"], r["mask"])] = r
    log, _ = procs["oom"].communicate(timeout=900)
    assert (out / "oom.json").exists(), log[-3000:]
    rows["oom"] = json.loads((out / "oom.json").read_text())
    return rows


# A forward with 2048 x 2048 blocks ([2048, 2048] fp32 scores alone are 16 MiB): the compiler
# must reject it (v5p: 16 MiB scoped VMEM), so a kernel that does not fit cannot pass unnoticed.
# 4/1 heads (grouped query, as the CI cases): the per-block VMEM need (24.2 MiB) is 32/8's, and
# the compile costs about half its CPU time.
OVERSIZED_BLOCKS = """
import json, sys
import jax, jax.numpy as jnp
from medjax.ops.pallas import flash_attention, tpu_compile
q = jax.ShapeDtypeStruct((1, 2048, 4, 128), jnp.bfloat16)
kv = jax.ShapeDtypeStruct((1, 2048, 1, 128), jnp.bfloat16)
fn = lambda q, k, v: flash_attention(q, k, v, block_q=2048, block_k=2048, backend="mosaic_tpu")
json.dump(tpu_compile.compile_for_tpu(fn, [q, kv, kv], "v5p"), open(sys.argv[1], "w"))
"""


def test_compiler_rejects_blocks_that_overflow_vmem(compiled):
    assert "VMEM overflow in medjax_flash_fwd" in compiled["oom"].get("error", ""), \
        compiled["oom"]


def _visible_pairs(T, mask):
    """Unmasked (query, key) pairs of one head."""
    if mask == "window":
        return int(np.minimum(np.arange(T) + 1, WINDOW).sum())
    if mask == "packed":
        lengths = np.bincount(packed_segments(T))
        return int((lengths * (lengths + 1) // 2).sum())
    return T * (T + 1) // 2


@pytest.mark.parametrize("chip", CHIPS)
@pytest.mark.parametrize("B,T,Hq,Hkv,mask", CI, ids=[f"{c[4]}-{c[1]}" for c in CI])
def test_compiles_with_mosaic_kernels(compiled, chip, B, T, Hq, Hkv, mask):
    row = compiled[(chip, T, mask)]
    assert "error" not in row, row["error"]
    if mask == "decode":
        assert row["tpu_custom_calls"] == 1 and set(row["vmem_mib"]) == {"medjax_flash_decode"}
        min_flops = 4 * 128 * Hq * B * (T // 2)          # the shortest cache row is T/2
    else:
        assert row["tpu_custom_calls"] == 3, row            # forward, dQ, dK/dV
        assert set(row["vmem_mib"]) == {"medjax_flash_fwd", "medjax_flash_bwd_dq",
                                        "medjax_flash_bwd_dkdv"}
        min_flops = 4 * 128 * Hq * B * _visible_pairs(T, mask)   # the forward's alone
    # The compiler's own allotment per kernel: blocked, so far below the whole-sequence sizes.
    assert 0 < max(row["vmem_mib"].values()) <= row["scoped_vmem_mib"], row
    assert row["flops"] >= min_flops, f"cost analysis {row['flops']:.3g} < {min_flops:.3g}"
