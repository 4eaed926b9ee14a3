"""2 processes × 4 CPU devices with jax.distributed on localhost (launch/local_multiprocess.sh):
fsdp training across processes, an orbax checkpoint saved by both, a restart that restores it
and continues with the losses of an uninterrupted run; each process reads disjoint rows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "local_multiprocess.sh"


def _run(out: Path, name: str, *extra: str) -> list[dict]:
    cmd = [str(LAUNCH), "-n", "2", "-d", "4", "--", sys.executable, "-m",
           "tests.distributed.multiprocess_worker", "--out", str(out), "--name", name, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-2000:]}"
    return [json.loads((out / f"{name}.p{i}.json").read_text()) for i in range(2)]


@pytest.mark.slow
def test_two_processes_fsdp_checkpoint_restart(tmp_path):
    full = _run(tmp_path, "full", "--start", "0", "--stop", "6", "--export", str(tmp_path / "hf"))
    first = _run(tmp_path, "first", "--start", "0", "--stop", "3", "--save", str(tmp_path / "ckpt"))
    second = _run(tmp_path, "second", "--start", "3", "--stop", "6", "--restore", str(tmp_path / "ckpt"))

    for p in range(2):
        rec = full[p]
        assert (rec["process"], rec["devices"], rec["local_devices"]) == (p, 8, 4)
        assert rec["q_proj_spec"] == "P('fsdp', None)" and rec["q_proj_local_shards"] == 4
        # both processes see the same global loss; restart continues exactly
        np.testing.assert_allclose(rec["losses"], full[0]["losses"], rtol=0, atol=0)
        np.testing.assert_allclose(first[p]["losses"] + second[p]["losses"], rec["losses"],
                                   rtol=0, atol=1e-6)
    # ... and equals the same model trained on one device in this process
    from medjax.models import get_preset
    from tests.distributed import common
    graphdef, state = common.build("tiny-llama")
    step, single = common.jit_step(graphdef), []
    for tokens in common.batches(6, 8, get_preset("tiny-llama").vocab_size):
        state, loss = step(state, tokens)
        single.append(float(loss))
    np.testing.assert_allclose(full[0]["losses"], single, rtol=0, atol=1e-5)
    # the HF export gathered from the 2-process sharded model holds the trained weights (AdamW
    # divides by sqrt(v): reduction-order noise in near-zero grads moves a weight by ~1e-5)
    import medjax
    from flax import nnx
    trained = nnx.merge(graphdef, state)[0]
    exported, _ = medjax.load(tmp_path / "hf", progress=False)
    for (path, a), b in zip(nnx.to_flat_state(nnx.state(trained, nnx.Param)),
                            nnx.to_flat_state(nnx.state(exported, nnx.Param)).leaves):
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                   rtol=0, atol=1e-4, err_msg=str(path))
    # each process read its own half of every global batch, never the other's
    for step in range(6):
        (s0, a0, b0, _), (s1, a1, b1, _) = full[0]["rows"][step], full[1]["rows"][step]
        assert s0 == s1 == step
        assert (a0, b0, a1, b1) == (0, 4, 4, 8)

