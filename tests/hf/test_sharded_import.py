"""Import straight into a sharding: every device block reads only its rows; logits unchanged."""
import subprocess
import sys

import pytest

from hf_fixtures import make_tiny_hf

CHILD = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import medjax
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

def shardings(path, shape):
    # shard the last dim over "model" and the first over "data" where divisible
    spec = [None] * len(shape)
    if len(shape) >= 2 and shape[-1] % 4 == 0:
        spec[-1] = "model"
    if len(shape) >= 2 and shape[0] % 2 == 0:
        spec[0] = "data"
    return NamedSharding(mesh, P(*spec))

ref, _ = medjax.load(sys.argv[1], progress=False)
sharded, _ = medjax.load(sys.argv[1], shardings=shardings, progress=False)
q = sharded.model.layers[0].self_attn.q_proj.kernel[...]
assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (32, 16), q.sharding
ids = jnp.arange(20)[None] % 256
from flax import nnx
for (path, a), b in zip(nnx.to_flat_state(nnx.state(ref)), nnx.to_flat_state(nnx.state(sharded)).leaves):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
# sharded matmuls reduce in another order: equal to float tolerance, not bit-identical
np.testing.assert_allclose(np.asarray(ref(ids)), np.asarray(sharded(ids)), atol=1e-5)
print("ok")
"""


def test_import_into_shardings(tmp_path):
    for family in ("llama2", "mixtral"):
        d = make_tiny_hf(family, tmp_path / family, seed=4)
        out = subprocess.run([sys.executable, "-c", CHILD, str(d)], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# The product path (mesh + rules): each distinct block is read once per process, and only its
# bytes. data=2 × fsdp=4 replicates every block twice; Mixtral (HF per-expert and the fused
# transformers-5 layout) with experts split too.
COUNT_CHILD = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from flax import nnx
import medjax
from medjax import sharding
from medjax.config import MeshSection
from medjax.hf import safetensors_io as io
read = {"bytes": 0}
for name in ("read", "read_region"):
    def counting(self, *a, _orig=getattr(io.TensorInfo, name), **k):
        out = _orig(self, *a, **k)
        read["bytes"] += out.nbytes
        return out
    setattr(io.TensorInfo, name, counting)
preset, sizes, scan = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "scan"
ref, _ = medjax.load(sys.argv[1], progress=False, scan_layers=scan)
mesh = sharding.make_mesh(MeshSection(preset=preset, **sizes))
read["bytes"] = 0
got, _ = medjax.load(sys.argv[1], mesh=mesh, rules=sharding.rules_for(preset), progress=False,
                     scan_layers=scan)
if scan:   # stacked weights [L, ...]: the layers axis is never split
    q = got.model.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec[0] is None and len(q.sharding.device_set) == 8, q.sharding
for (path, a), b in zip(nnx.to_flat_state(nnx.state(ref)), nnx.to_flat_state(nnx.state(got)).leaves):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
print(json.dumps({"read": read["bytes"], "file": sum(t.end - t.start for t in io.index_tensors(io.find_weight_files(sys.argv[1])).values())}))
"""


def _fuse_experts(src, dst):
    """The same Mixtral checkpoint in transformers 5's fused expert layout."""
    import json
    import re
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors, experts = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.(experts\.(\d+)\.(w\d)|gate)\.weight", name)
        if m is None:
            tensors[name] = w
        elif m.group(2) == "gate":
            tensors[f"model.layers.{m.group(1)}.mlp.gate.weight"] = w
        else:
            experts[(int(m.group(1)), m.group(4), int(m.group(3)))] = w
    layers = sorted({k[0] for k in experts})
    n = 1 + max(k[2] for k in experts)
    for i in layers:
        stack = lambda w: np.stack([experts[(i, w, e)] for e in range(n)])  # noqa: E731
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate([stack("w1"), stack("w3")], 1)
        tensors[f"model.layers.{i}.mlp.experts.down_proj"] = stack("w2")
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("layout", ["loop", "scan"])
def test_mesh_import_reads_each_block_once(layout, tmp_path):
    """Per-layer tensors (loop) or index i of the stacked [L, ...] arrays (scan): either way each
    block is read once."""
    import json
    llama = make_tiny_hf("llama2", tmp_path / "llama2", seed=5)
    mixtral = make_tiny_hf("mixtral", tmp_path / "mixtral", seed=5)
    runs = [(llama, "fsdp", {"data": 2, "fsdp": 4}), (mixtral, "fsdp_ep", {"fsdp": 2, "expert": 4})]
    if layout == "loop":
        runs.append((_fuse_experts(mixtral, tmp_path / "fused"), "fsdp_ep", {"fsdp": 2, "expert": 4}))
    for d, preset, sizes in runs:
        out = subprocess.run([sys.executable, "-c", COUNT_CHILD, str(d), preset, json.dumps(sizes),
                              layout], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["read"] == r["file"], (d.name, r)      # every byte once, none twice


GGUF_CHILD = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from flax import nnx
import medjax
from medjax import sharding
from medjax.config import MeshSection
model, tok = medjax.load(sys.argv[1], progress=False)
medjax.save_gguf(model, sys.argv[2], tokenizer=tok, type="f32")
ref, _ = medjax.load(sys.argv[2])
mesh = sharding.make_mesh(MeshSection(preset="fsdp"))
got, _ = medjax.load(sys.argv[2], mesh=mesh, rules=sharding.rules_for("fsdp"))
q = got.model.layers[0].self_attn.q_proj.kernel[...]
assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[0] == q.shape[0] // 8
for (path, a), b in zip(nnx.to_flat_state(nnx.state(ref)), nnx.to_flat_state(nnx.state(got)).leaves):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
print("ok")
"""


def test_gguf_imports_into_the_mesh(tmp_path):
    d = make_tiny_hf("llama2", tmp_path / "llama2", seed=6)
    out = subprocess.run([sys.executable, "-c", GGUF_CHILD, str(d), str(tmp_path / "m.gguf")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
