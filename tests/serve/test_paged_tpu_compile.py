"""The real TPU compiler (libtpu, compile-only) accepts the Pallas paged decode kernel.

Llama-3-8B's attention shapes (Hq/Hkv = 32/8, D = 128, bf16), 16 sequences over a pool of 2048
pages of 16 tokens, page tables 256 pages wide (4k tokens): it must compile for v5e with the
Mosaic kernel in the HLO (``ops.paged_attention``'s "auto" picked it, not the XLA path) within
the chip's scoped VMEM. Runs in
``.venv-tpu`` (libtpu lives only there) with the compile-only environment.
"""
import json
import subprocess

import pytest

from medjax.ops.pallas import tpu_compile

pytestmark = pytest.mark.skipif(
    not tpu_compile.TPU_VENV_PYTHON.exists(),
    reason=f"no {tpu_compile.TPU_VENV_PYTHON} (libtpu lives only there): run `make tpu-venv`")

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from medjax.ops.pallas import tpu_compile
from medjax.ops.paged_attention import paged_attention
B, Hq, Hkv, D, N, page, P = 16, 32, 8, 128, 2048, 16, 256
S = jax.ShapeDtypeStruct
args = [S((B, 1, Hq, D), jnp.bfloat16), S((N, Hkv, page, D), jnp.bfloat16),
        S((N, Hkv, page, D), jnp.bfloat16), S((B, P), jnp.int32), S((B,), jnp.int32)]
fn = lambda q, k, v, t, n: paged_attention(q, k, v, t, n)      # "auto": the TPU branch
json.dump(tpu_compile.compile_for_tpu(fn, args, sys.argv[2]), open(sys.argv[1], "w"))
"""


def test_paged_kernel_compiles_for_tpu(tmp_path):
    out = tmp_path / "paged.json"
    proc = subprocess.run([str(tpu_compile.TPU_VENV_PYTHON), "-c", SCRIPT, str(out), "v5e"],
                          env=tpu_compile.compile_only_env(), capture_output=True, text=True,
                          timeout=600)
    assert out.exists(), (proc.stdout + proc.stderr)[-3000:]
    row = json.loads(out.read_text())
    assert "error" not in row, row["error"]
    assert row["tpu_custom_calls"] == 1 and set(row["vmem_mib"]) == {"medjax_paged_decode"}
    assert 0 < row["vmem_mib"]["medjax_paged_decode"] <= 16, row
