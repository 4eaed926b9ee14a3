"""``medjax.load``, the one loader: HF directories, GGUF files and training runs (medjax/loading.py)."""
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from medjax.errors import CheckpointError, ConfigError
from medjax.loading import checkpoint_dir, load, load_run, run_checkpoints

IDS = jnp.asarray([[5, 17, 42, 99, 7]], jnp.int32)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 2-step LoRA run of a tiny llama with one checkpoint."""
    from train.train_helpers import make_tiny_model_dir, tiny_config, write_alpaca

    from medjax.run import run
    root = tmp_path_factory.mktemp("loading")
    base = make_tiny_model_dir(root / "base")
    cfg = tiny_config(base, write_alpaca(root / "train.jsonl"), root / "run", train__steps=2,
                      checkpoint__every=2, lora__enabled=True, lora__rank=2, lora__alpha=4,
                      lora__targets=["q_proj", "v_proj"])
    run(cfg, show_bar=False)
    return root


def test_run_checkpoints_tells_a_run_from_other_paths(lora_run, tmp_path):
    run_dir = lora_run / "run"
    assert run_checkpoints(run_dir) == run_dir / "checkpoints"
    assert run_checkpoints(run_dir / "checkpoints") == run_dir / "checkpoints"
    assert run_checkpoints(lora_run / "base") is None              # an HF directory (config.json)
    assert run_checkpoints(lora_run / "train.jsonl") is None       # a file
    assert run_checkpoints(tmp_path) is None                       # an empty directory
    assert run_checkpoints(tmp_path / "absent") is None
    with pytest.raises(CheckpointError, match="not a training run.*" + tmp_path.name):
        checkpoint_dir(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory.*absent"):
        load_run(tmp_path / "absent")


def test_a_bad_path_is_a_checkpoint_error_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="weights.bin: expected an HF model directory or a .gguf"):
        load(tmp_path / "weights.bin")


def test_a_run_loads_as_its_checkpoint_with_adapters_merged(lora_run):
    """The run directory and its checkpoints/ give the same model: the restored one, LoRA merged
    (the adapters trained: it is not the base); ``merge_adapters=False`` keeps the wrappers."""
    from medjax.lora import lora_modules
    from medjax.train.setup import plain_model
    run = load_run(lora_run / "run")
    assert run.step == 2 and run.config.lora.enabled and lora_modules(run.model)
    want = np.asarray(plain_model(run.model)(IDS))
    for path in (lora_run / "run", lora_run / "run" / "checkpoints"):
        model, tokenizer = load(path)
        assert not lora_modules(model) and tokenizer is not None
        np.testing.assert_allclose(np.asarray(model(IDS)), want, rtol=1e-5, atol=1e-5)
    wrapped, _ = load(lora_run / "run", merge_adapters=False)
    assert lora_modules(wrapped)
    np.testing.assert_allclose(np.asarray(wrapped(IDS)), want, rtol=1e-4, atol=1e-4)
    base, _ = load(lora_run / "base")
    assert not np.allclose(np.asarray(base(IDS)), want, atol=1e-4)


def test_a_run_keeps_its_own_dtype(lora_run):
    load(lora_run / "run", jnp.float32)                             # the run's model.dtype: fine
    with pytest.raises(ConfigError, match="model.dtype=float32"):
        load(lora_run / "run", jnp.bfloat16)


def test_import_medjax_starts_no_jax():
    """The public API is imported on first use: ``import medjax.errors`` (every CLI's start) is cheap."""
    code = ("import sys, medjax, medjax.errors; assert 'jax' not in sys.modules, 'jax imported'; "
            "assert callable(medjax.load) and 'medjax.loading' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
