"""EasyDeL's side of ``bench peers`` (run by ``.venv-easydel``'s Python, see ``protocol``).

EasyDeL's own pieces: ``LlamaForCausalLM`` (flax nnx; its default attention, ``vanilla`` on CPU;
the TPU rows ask for ``blocksparse``, its splash-attention kernel from ejkernel), its LoRA
(``apply_lora_to_layers``: ``eLoRA``, B = 0, no alpha scaling), its ``EasyDeLState`` and the
very ``training_step`` its ``Trainer`` jits (``trainers/trainer/_fn.py``: ``compute_loss`` with
its causal-LM loss, ``value_and_grad``, ``apply_gradients``) under its ``ejit`` with the state
donated, AdamW after clipping as ``protocol`` sets them.

Adaptations: ejit's on-disk compilation cache goes to a fresh directory per run (a cold first
step, as the other sides have). And two to run at all here: EasyDeL's import appends GPU-only ``XLA_FLAGS``
(``EASYDEL_AUTO``), which jaxlib 0.10.2's CPU client rejects as fatal ("Unknown flag in
XLA_FLAGS: --xla_gpu_enable_shared_constants"): ``XLA_FLAGS`` is put back after the import
(its ``LIBTPU_INIT_ARGS`` stay). There is no torch-free HF loader: the weights are copied from
the safetensors by name (HF ``[out, in]`` → ``kernel [in, out]``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import protocol

LORA_PATTERN = r".*(" + "|".join(protocol.LORA_TARGETS) + r")$"


def _import_easydel():
    import tempfile
    # ejit points jax's persistent compilation cache at ~/.cache/easydel: a later run would load
    # the step instead of compiling it. A fresh, empty cache per run: a cold first step, as the
    # other sides have (they keep no cache).
    os.environ["COMPILE_FUNC_DIR"] = tempfile.mkdtemp(prefix="easydel-ejit-")
    saved = os.environ.get("XLA_FLAGS")
    import easydel  # noqa: F401 — its import sets the environment (EASYDEL_AUTO)
    if saved is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = saved
    return easydel


def _set(variable, array):
    import jax.numpy as jnp
    assert tuple(variable.get_value().shape) == tuple(array.shape), (variable, array.shape)
    variable.set_value(jnp.asarray(array, variable.get_value().dtype))


def load_hf_weights(model, weights_dir) -> int:
    """Copy an HF Llama safetensors directory into ``model`` by name; returns tensors copied."""
    from safetensors.numpy import load_file
    n = 0
    for f in sorted(Path(weights_dir).glob("*.safetensors")):
        for key, array in load_file(f).items():
            *path, leaf = key.split(".")
            module = model
            for part in path:
                module = module[int(part)] if part.isdigit() else getattr(module, part)
            if hasattr(module, "embedding"):
                _set(module.embedding, array)
            elif array.ndim == 2:
                _set(module.kernel, array.T)
            else:
                _set(module.kernel, array)
            n += 1
    return n


def _tx():
    import optax
    return optax.chain(optax.clip_by_global_norm(protocol.CLIP_NORM),
                       optax.adamw(protocol.LR, protocol.B1, protocol.B2, protocol.EPS,
                                   weight_decay=protocol.WEIGHT_DECAY))


def cpu(args) -> dict:
    _import_easydel()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from easydel.modules.llama import LlamaConfig, LlamaForCausalLM
    from easydel.trainers.trainer._fn import training_step
    from easydel.utils.compiling_utils import ejit

    ids = protocol.load_batch(args.batch)
    config = LlamaConfig.from_pretrained(args.weights)
    model = LlamaForCausalLM(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    load_hf_weights(model, args.weights)
    if args.mode == "lora":
        model = model.apply_lora_to_layers(protocol.LORA_RANK, lora_pattern=LORA_PATTERN,
                                           rngs=nnx.Rngs(1))
    state = model.to_state().init_tx(_tx())
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones(ids.shape, jnp.int32)}
    step = ejit(training_step, static_argnums=(2, 3, 4, 5, 6), donate_argnums=(0,))
    box = {"state": state}

    def one():
        box["state"], metrics = step(box["state"], batch, None, None, None, 1, None)
        return float(jax.block_until_ready(metrics.loss))

    with model.mesh:                         # as its Trainer runs the step
        out = protocol.time_steps(one, args.steps)
    import easydel
    out["version"] = f"easydel {easydel.__version__} (jax {jax.__version__})"
    out["attention"] = str(config.attn_mechanism)
    del np
    return out


def tpu(args) -> dict:
    raise NotImplementedError("EasyDeL TPU compile row: not written yet")


if __name__ == "__main__":
    args = protocol.side_parser("easydel_side.py").parse_args()
    protocol.run_side(lambda: (cpu if args.what == "cpu" else tpu)(args))
    sys.exit(0)
