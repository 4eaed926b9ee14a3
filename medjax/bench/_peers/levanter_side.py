"""levanter's side of ``bench peers`` (run by ``.venv-levanter``'s Python, see ``protocol``).

levanter's own pieces: ``LlamaLMHeadModel`` (haliax named axes, layers stacked and scanned),
its default attention for the platform (CPU: ``JAX_FLASH``, a blocked pure-JAX flash attention;
the TPU rows ask for ``SPLASH``, jax's Pallas splash kernel, since the compile-only host's
default device is the CPU), ``compute_next_token_loss`` (its blockwise cross-entropy), its
``loraize`` + ``lora_trainable_params_filter``, and its mixed precision (``jmp``
``p=f32,c=bfloat16`` for the TPU rows, as its trainer's default). Around them the step is
written here the way levanter's ``Trainer`` runs it: equinox partition into trainable/frozen,
``filter_value_and_grad``, an optax AdamW after global-norm clipping (``protocol``'s settings),
``haliax.named_jit`` with the parameter axis mapping (TPU: FSDP, ``embed`` over ``data``).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import protocol


def _levanter_config(hf_dir=None, **overrides):
    from levanter.models.llama import LlamaConfig
    if hf_dir is None:
        return LlamaConfig(**overrides)
    from transformers import LlamaConfig as HfLlamaConfig
    hf = HfLlamaConfig.from_pretrained(hf_dir)
    return dataclasses.replace(LlamaConfig.from_hf_config(hf), **overrides), hf.vocab_size


def _make_step(frozen, lora: bool, policy=None, compute_mapping=None):
    import equinox as eqx
    import haliax as hax
    import jax.numpy as jnp
    import optax
    from levanter.models.lm_model import compute_next_token_loss
    opt = optax.chain(optax.clip_by_global_norm(protocol.CLIP_NORM),
                      optax.adamw(protocol.LR, protocol.B1, protocol.B2, protocol.EPS,
                                  weight_decay=protocol.WEIGHT_DECAY))

    def step(trainable, opt_state, frozen, example):
        def loss_fn(tr):
            if compute_mapping is not None:           # as its Trainer's loss_fn: compute layout
                with hax.axis_mapping(compute_mapping):
                    return _loss(tr)
            return _loss(tr)

        def _loss(tr):
            model = eqx.combine(tr, frozen)
            if policy is not None:
                model = policy.cast_to_compute(model)
            # levanter (2025-09) reduces with jnp.mean(where=<float mask>), which jax 0.10
            # refuses ("where must be None or a boolean array"): take its per-token losses
            # (already zero off the mask) and divide by the mask's count, which is that mean
            per_token = compute_next_token_loss(model, example, reduction=None)
            return jnp.sum(per_token.array) / jnp.sum(example.loss_mask.array.astype(jnp.float32))
        loss, grads = eqx.filter_value_and_grad(loss_fn)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return loss, eqx.apply_updates(trainable, updates), opt_state
    return opt, step


def _zero_lora_b(model):
    """levanter draws LoRA's B at random (``hnn.Linear.init``), so its first step would not start
    from the base model; PEFT and medjax start B at zero. Same shapes and cost, B = 0."""
    import equinox as eqx
    import haliax as hax
    import jax
    from levanter.lora import LowRankLinear

    def zero(node):
        if isinstance(node, LowRankLinear):
            return eqx.tree_at(lambda m: m.lora_B.weight, node, hax.zeros_like(node.lora_B.weight))
        return node
    return jax.tree_util.tree_map(zero, model, is_leaf=lambda x: isinstance(x, LowRankLinear))


def _is_float(x) -> bool:
    """equinox's is_inexact_array, also for the ShapeDtypeStructs of a shapes-only model (else a
    shapes-only full fine-tuning step would have nothing to train: a forward pass only)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    if isinstance(x, jax.ShapeDtypeStruct):
        return jnp.issubdtype(x.dtype, jnp.inexact)
    return eqx.is_inexact_array(x)


def _split(model, lora: bool, key, concrete: bool = True):
    import equinox as eqx
    from levanter.lora import LoraConfig, loraize, lora_trainable_params_filter
    if lora:
        model = loraize(model, LoraConfig(target_modules=list(protocol.LORA_TARGETS),
                                          r=protocol.LORA_RANK, alpha=protocol.LORA_ALPHA,
                                          dropout=0.0), key=key)
        if concrete:
            model = _zero_lora_b(model)
        adapters, base = eqx.partition(model, lora_trainable_params_filter(model))
        trainable, rest = eqx.partition(adapters, _is_float)   # as its Trainer does
        return trainable, eqx.combine(base, rest), model
    return (*eqx.partition(model, _is_float), model)


def _example(ids, Batch, Pos):
    import haliax as hax
    import jax.numpy as jnp
    from levanter.models.lm_model import LmExample
    tokens = hax.named(jnp.asarray(ids), (Batch, Pos))
    return hax.vmap(LmExample.causal, Batch)(tokens)


def cpu(args) -> dict:
    import equinox as eqx
    import haliax as hax
    import jax
    from haliax.state_dict import from_torch_compatible_state_dict
    from levanter.models.llama import LlamaLMHeadModel
    from safetensors.numpy import load_file

    ids = protocol.load_batch(args.batch)
    B, T = ids.shape
    config, vocab = _levanter_config(args.weights, seq_len=T, gradient_checkpointing=False)
    Vocab = hax.Axis("vocab", vocab)
    state = {}
    for f in sorted(Path(args.weights).glob("*.safetensors")):
        state.update(load_file(f))
    template = eqx.filter_eval_shape(LlamaLMHeadModel.init, Vocab, config, key=jax.random.PRNGKey(0))
    model = from_torch_compatible_state_dict(template, state)
    trainable, frozen, _ = _split(model, args.mode == "lora", jax.random.PRNGKey(1))
    opt, step = _make_step(frozen, args.mode == "lora")
    opt_state = opt.init(trainable)
    example = _example(ids, hax.Axis("batch", B), config.Pos)
    jitted = hax.named_jit(step, donate_args=(True, True, False, False))   # the step's state
    box = {"s": (trainable, opt_state)}

    def one():
        loss, tr, os_ = jitted(box["s"][0], box["s"][1], frozen, example)
        box["s"] = (tr, os_)
        return float(jax.block_until_ready(loss))

    out = protocol.time_steps(one, args.steps)
    import levanter
    out["version"] = f"levanter {getattr(levanter, '__version__', '1.2 (source)')} (jax {jax.__version__})"
    return out


def tpu(args) -> dict:
    import time

    import equinox as eqx
    import haliax as hax
    import jax
    import jax.numpy as jnp
    import jmp
    import numpy as np
    from jax.sharding import Mesh
    from levanter.layers.attention import AttentionBackend
    from levanter.models.llama import LlamaLMHeadModel

    devices = protocol.tpu_devices(args.topology)
    mesh = Mesh(np.array(devices).reshape(1, len(devices), 1), ("replica", "data", "model"))
    s = protocol.LLAMA2_7B
    config = _levanter_config(
        seq_len=args.seq, hidden_dim=s["hidden_size"], intermediate_dim=s["intermediate_size"],
        num_layers=args.layers, num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"],
        layer_norm_epsilon=s["rms_norm_eps"], attn_backend=AttentionBackend.SPLASH,
        gradient_checkpointing=True, scan_layers=not args.unroll)
    Vocab = hax.Axis("vocab", s["vocab_size"])
    compute_mapping = {"batch": ("replica", "data")}             # its TrainerConfig's defaults:
    param_mapping = {"embed": "data", "batch": ("replica", "data")}   # FSDP over "embed"
    policy = jmp.get_policy("p=f32,c=bfloat16")
    Batch, Pos = hax.Axis("batch", args.global_batch), config.Pos
    ids = jax.ShapeDtypeStruct((args.global_batch, args.seq), jnp.int32)
    t0 = time.perf_counter()
    with protocol.target_v5p(), mesh, hax.axis_mapping(param_mapping):
        model = eqx.filter_eval_shape(LlamaLMHeadModel.init, Vocab, config, key=jax.random.PRNGKey(0))
        trainable, frozen, _ = _split(model, args.mode == "lora", jax.random.PRNGKey(1), concrete=False)
        opt, step = _make_step(frozen, args.mode == "lora", policy, compute_mapping)
        opt_state = eqx.filter_eval_shape(opt.init, trainable)
        example = eqx.filter_eval_shape(lambda i: _example(i, Batch, Pos), ids)
        # its state lives sharded by the parameter mapping (its trainer shards it at init): the
        # same shardings in and out, so the donated state is updated in place
        jitted = hax.named_jit(step, axis_resources=param_mapping, in_axis_resources=param_mapping,
                               out_axis_resources=param_mapping, donate_args=(True, True, False, False))
        # named_jit splits its arguments with equinox's is_array, which takes a ShapeDtypeStruct
        # for a static value: for this lowering on shapes only, shapes count as arrays
        is_array = hax.partitioning.is_array
        hax.partitioning.is_array = lambda x: is_array(x) or isinstance(x, jax.ShapeDtypeStruct)
        try:
            compiled = jitted.lower(trainable, opt_state, frozen, example).compile()
        finally:
            hax.partitioning.is_array = is_array
    return protocol.compile_report(compiled, time.perf_counter() - t0, scanned_layers=not args.unroll,
                                   hlo_path=args.hlo)


if __name__ == "__main__":
    args = protocol.side_parser("levanter_side.py").parse_args()
    protocol.run_side(lambda: (cpu if args.what == "cpu" else tpu)(args))
    sys.exit(0)
