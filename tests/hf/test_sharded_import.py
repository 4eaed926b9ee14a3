"""Import straight into a sharding, on the session's 8 CPU devices: every device block reads only
its rows; weights and logits unchanged."""
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import medjax
from hf_fixtures import make_tiny_hf
from medjax import sharding
from medjax.config import MeshSection
from medjax.hf import safetensors_io as io

pytestmark = pytest.mark.multidevice


def _assert_same_weights(ref, got):
    for (path, a), b in zip(nnx.to_flat_state(nnx.state(ref)), nnx.to_flat_state(nnx.state(got)).leaves):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


@pytest.mark.parametrize("family", ["llama2", "mixtral"])
def test_import_into_shardings(tmp_path, family):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

    def shardings(path, shape):    # the last dim over "model", the first over "data", where divisible
        spec = [None] * len(shape)
        if len(shape) >= 2 and shape[-1] % 4 == 0:
            spec[-1] = "model"
        if len(shape) >= 2 and shape[0] % 2 == 0:
            spec[0] = "data"
        return NamedSharding(mesh, P(*spec))

    d = make_tiny_hf(family, tmp_path / family, seed=4)
    ref, _ = medjax.load(d, progress=False)
    got, _ = medjax.load(d, shardings=shardings, progress=False)
    q = got.model.layers[0].self_attn.q_proj.kernel[...]
    assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (32, 16), q.sharding
    _assert_same_weights(ref, got)
    ids = jnp.arange(20)[None] % 256     # sharded matmuls reduce in another order: float tolerance
    np.testing.assert_allclose(np.asarray(ref(ids)), np.asarray(got(ids)), atol=1e-5)


def _fuse_experts(src, dst):
    """The same Mixtral checkpoint in transformers 5's fused expert layout."""
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


def _bytes_read_by_mesh_import(monkeypatch, d, preset, sizes, scan):
    """Load ``d`` into ``preset``'s mesh (checking every weight against a plain load) and return
    the bytes the mesh import read, with the bytes of the file's tensors."""
    read = {"bytes": 0}
    for name in ("read", "read_region"):
        def counting(self, *a, _orig=getattr(io.TensorInfo, name), **k):
            out = _orig(self, *a, **k)
            read["bytes"] += out.nbytes
            return out
        monkeypatch.setattr(io.TensorInfo, name, counting)
    ref, _ = medjax.load(d, progress=False, scan_layers=scan)
    mesh = sharding.make_mesh(MeshSection(preset=preset, **sizes))
    read["bytes"] = 0
    got, _ = medjax.load(d, mesh=mesh, rules=sharding.rules_for(preset), progress=False, scan_layers=scan)
    if scan:   # stacked weights [L, ...]: the layers axis is never split
        q = got.model.layers.self_attn.q_proj.kernel[...]
        assert q.sharding.spec[0] is None and len(q.sharding.device_set) == 8, q.sharding
    _assert_same_weights(ref, got)
    file_bytes = sum(t.end - t.start for t in io.index_tensors(io.find_weight_files(d)).values())
    return read["bytes"], file_bytes


@pytest.mark.parametrize("layout", ["loop", "scan"])
def test_mesh_import_reads_each_block_once(layout, tmp_path, monkeypatch):
    """The product path (mesh + rules): each distinct block is read once per process, and only its
    bytes — per-layer tensors (loop) or index i of the stacked [L, ...] arrays (scan). data=2 ×
    fsdp=4 replicates every block twice; Mixtral (HF per-expert and the fused transformers-5
    layout) with experts split too."""
    llama = make_tiny_hf("llama2", tmp_path / "llama2", seed=5)
    mixtral = make_tiny_hf("mixtral", tmp_path / "mixtral", seed=5)
    runs = [(llama, "fsdp", {"data": 2, "fsdp": 4}), (mixtral, "fsdp_ep", {"fsdp": 2, "expert": 4})]
    if layout == "loop":
        runs.append((_fuse_experts(mixtral, tmp_path / "fused"), "fsdp_ep", {"fsdp": 2, "expert": 4}))
    for d, preset, sizes in runs:
        read, file_bytes = _bytes_read_by_mesh_import(monkeypatch, d, preset, sizes, layout == "scan")
        assert read == file_bytes, (d.name, json.dumps({"read": read, "file": file_bytes}))  # every byte once


def test_gguf_imports_into_the_mesh(tmp_path):
    d = make_tiny_hf("llama2", tmp_path / "llama2", seed=6)
    model, tok = medjax.load(d, progress=False)
    medjax.save_gguf(model, tmp_path / "m.gguf", tokenizer=tok, type="f32")
    ref, _ = medjax.load(tmp_path / "m.gguf")
    mesh = sharding.make_mesh(MeshSection(preset="fsdp"))
    got, _ = medjax.load(tmp_path / "m.gguf", mesh=mesh, rules=sharding.rules_for("fsdp"))
    q = got.model.layers[0].self_attn.q_proj.kernel[...]
    assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[0] == q.shape[0] // 8
    _assert_same_weights(ref, got)
