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
    # fp32 throughout, as every side: EasyDeL's attention otherwise computes in bf16 (attn_dtype)
    config = LlamaConfig.from_pretrained(args.weights, attn_dtype=jnp.float32, kvdtype=jnp.float32)
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


def _abstract_sharded(state, model, mesh):
    """``state`` (shapes only) with every leaf a ShapeDtypeStruct carrying the sharding that
    EasyDeL's ``EasyDeLState.shard_state`` would ``device_put`` it with (its partition rules,
    its divisibility fix-ups), for lowering without allocating."""
    import jax
    import eformer.escale as es
    from eformer.escale import match_partition_rules
    from easydel.infra.base_state import _sanitize_partition_specs_for_shape_tree
    from jax.sharding import PartitionSpec
    rules = model._get_partition_rules(None)
    specs = match_partition_rules(rules, state)
    specs, _ = _sanitize_partition_specs_for_shape_tree(partition_specs=specs, shape_tree=state, mesh=mesh)
    with mesh:
        shardings = jax.tree_util.tree_map(
            lambda spec, leaf: (es.get_corrected_named_sharding(tuple(leaf.shape), spec)
                                if isinstance(spec, PartitionSpec) and hasattr(leaf, "shape") else None),
            specs, state)
    return jax.tree_util.tree_map(
        lambda sh, leaf: (jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh)
                          if sh is not None else leaf),
        shardings, state, is_leaf=lambda x: x is None)


def _kernels_for_tpu():
    """ejkernel picks a kernel's platform and implementation from ``jax.default_backend()``, the
    CPU on this compile-only host, which would give its XLA fallback: in ejkernel's platform
    detection and kernel registry (only there) the default backend is the TPU compiled for, as
    on a TPU host, so "auto" picks its Pallas (Mosaic) TPU kernel."""
    import importlib

    import jax

    class TpuJax:
        def __getattr__(self, name):
            return getattr(jax, name)

        @staticmethod
        def default_backend():
            return "tpu"
    for name in ("ejkernel.modules.base", "ejkernel.kernels._registry"):
        importlib.import_module(name).jax = TpuJax()
    # ejkernel 0.0.78 (pinned by EasyDeL 0.3.0, written for jax 0.9) calls pltpu.repeat, which
    # jax 0.10 removed; jax's own splash kernel replaced pltpu.repeat(x, r, axis=1) with
    # jnp.tile(x, (1, r)): the same replacement here
    from jax.experimental.pallas import tpu as pltpu
    if not hasattr(pltpu, "repeat"):
        import jax.numpy as jnp
        pltpu.repeat = lambda x, repeats, axis: jnp.tile(
            x, tuple(repeats if i == axis % x.ndim else 1 for i in range(x.ndim)))


def tpu(args) -> dict:
    _import_easydel()
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from easydel.modules.llama import LlamaConfig, LlamaForCausalLM
    from easydel.trainers.trainer._fn import training_step

    devices = protocol.tpu_devices(args.topology)
    names = ("dp", "fsdp", "ep", "tp", "sp")                 # its default mesh: (1, -1, 1, 1, 1)
    mesh = Mesh(np.array(devices).reshape(1, len(devices), 1, 1, 1), names)
    s = protocol.LLAMA2_7B
    config = LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=args.layers,
        num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        head_dim=s["head_dim"], rms_norm_eps=s["rms_norm_eps"], rope_theta=s["rope_theta"],
        max_position_embeddings=args.seq, attn_mechanism="blocksparse", attn_dtype=jnp.bfloat16,
        gradient_checkpointing="nothing_saveable", backend="tpu", tie_word_embeddings=False)
    config.set_model_mesh(mesh)        # its own override: compile-only devices, not jax.devices()
    _kernels_for_tpu()
    t0 = time.perf_counter()
    with protocol.target_v5p(), mesh:
        model = LlamaForCausalLM.lazy_init(config=config, dtype=jnp.bfloat16,
                                           param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        state = jax.eval_shape(lambda st: st.init_tx(_tx()), model.to_state())
        state = _abstract_sharded(state, model, mesh)
        batch_sharding = NamedSharding(mesh, PartitionSpec(("dp", "fsdp")))
        ids = jax.ShapeDtypeStruct((args.global_batch, args.seq), jnp.int32, sharding=batch_sharding)
        batch = {"input_ids": ids, "attention_mask": ids}
        step = jax.jit(training_step, static_argnums=(2, 3, 4, 5, 6), donate_argnums=(0,))
        compiled = step.lower(state, batch, None, None, None, 1, None).compile()
    return protocol.compile_report(compiled, time.perf_counter() - t0, scanned_layers=False,
                                   hlo_path=args.hlo)


if __name__ == "__main__":
    args = protocol.side_parser("easydel_side.py").parse_args()
    protocol.run_side(lambda: (cpu if args.what == "cpu" else tpu)(args))
    sys.exit(0)
