"""The GPU compiler (jax[cuda12], compile-only H100) takes the Triton paged decode kernel.

``tests/compile_only/paged_triton_h100_check.py`` runs in ``.venv-cuda`` (the CUDA plugin lives
only there) and compiles ``ops.paged_attention(implementation="auto")`` at Llama-3-8B's
attention shapes and the serving engine's decode step for one H100 with XLA's GPU pipeline, the
Triton compiler included (it refuses kernels over the H100's shared memory).
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_PY = ROOT / ".venv-cuda" / "bin" / "python"

pytestmark = pytest.mark.skipif(
    not CUDA_PY.exists(), reason=f"no {CUDA_PY} (the CUDA compiler lives only there): run "
                                 f"`make cuda-venv` (optional, ~5.5 GB)")


def test_auto_compiles_the_triton_kernel_for_an_h100():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    res = subprocess.run([str(CUDA_PY), "tests/compile_only/paged_triton_h100_check.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # "auto": one Triton kernel and no XLA page loop; "xla" is the loop (the check can tell)
    for case in ("attention", "attention_fp32_T4_window"):
        assert got[case]["triton"] == 1 and got[case]["while"] == 0, got
        assert got[case]["paged_kernels"] > 0, got              # the call is ours, by name
    assert got["attention_xla"] == {"triton": 0, "while": 1, "paged_kernels": 0}, got
    # the engine's decode step: the kernel in every layer, no page loop anywhere
    step = got["decode_step"]
    assert step["triton"] == step["layers"] and step["while"] == 0, step
    assert step["paged_kernels"] > 0, step
