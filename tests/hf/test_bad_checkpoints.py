"""Each corrupt or mismatched checkpoint raises one clear error naming the file and tensor."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import medjax
from hf_fixtures import make_tiny_hf
from medjax.errors import CheckpointError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_tiny_hf("llama2", tmp_path_factory.mktemp("good"), seed=1)


def _copy(good, tmp_path, mutate):
    tensors = load_file(str(good / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((good / "config.json").read_text())
    return tmp_path


def test_missing_tensor(good, tmp_path):
    d = _copy(good, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        medjax.load(d, progress=False)


def test_unexpected_tensor(good, tmp_path):
    d = _copy(good, tmp_path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.0.extra.weight'"):
        medjax.load(d, progress=False)


def test_shape_mismatch(good, tmp_path):
    def mutate(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((5, 64), np.float32)
    d = _copy(good, tmp_path, mutate)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[5, 64\]"):
        medjax.load(d, progress=False)


def test_unsupported_architecture(good, tmp_path):
    cfg = json.loads((good / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        medjax.load(tmp_path, progress=False)


def test_pickle_only_directory_is_refused(good, tmp_path):
    (tmp_path / "config.json").write_text((good / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"only pickle weights found \(pytorch_model.bin\)"):
        medjax.load(tmp_path, progress=False)


def test_truncated_safetensors(good, tmp_path):
    data = (good / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    (tmp_path / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' ends at byte .* truncated"):
        medjax.load(tmp_path, progress=False)


def test_header_claiming_huge_size_is_rejected_before_allocation(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    from medjax.hf.safetensors_io import read_header
    with pytest.raises(CheckpointError, match=r"tensor 'w' offsets 0..16 do not match"):
        read_header(tmp_path / "model.safetensors")
    (tmp_path / "bad2.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(CheckpointError, match="header claims"):
        read_header(tmp_path / "bad2.safetensors")


def test_overlapping_tensors_rejected(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 24)
    from medjax.hf.safetensors_io import read_header
    with pytest.raises(CheckpointError, match="overlap"):
        read_header(tmp_path / "x.safetensors")
