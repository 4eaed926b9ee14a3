"""The planner's accounting: per-device bytes of a training run, from shapes alone (``jax.eval_shape``).

The model is built with ``nnx.eval_shape`` (no memory), LoRA applied to the abstract model when
``lora.enabled``; each variable's per-device size follows the mesh preset's sharding rules
(medjax/sharding.py), exactly as training will lay it out. Accounting (medjax/train/step.py):

* params     trainable variables in fp32 (the optimizer's master copy); frozen base weights in
             ``model.param_dtype``; with ``lora.quantize`` exactly what medjax/quant/ stores:
             the codes of each quantized kernel (int8: 1 byte, nf4: 1/2), its scales (int8: one
             fp32 per output channel; nf4: one fp32 per block, or int8 codes + one fp32 per 256
             with double quant), while embeddings, norms and lm_head stay in ``param_dtype``
             (the abstract model is wrapped AND quantized under ``nnx.eval_shape``);
* reference  DPO with full fine-tuning: the frozen copy of the trainable weights
             (``param_dtype``) the objective keeps beside the train state;
* grads      fp32, one per trainable element; with ``grad_accum > 1`` under the layer scan a
             second set (the backward scan's stacked per-layer gradients, added into the
             accumulator after it; the loop layout adds each layer's as it is made). The
             layer scan's stacked gradients are in ``model.dtype`` (it runs on the weights cast
             to it, ``stack.compute_weights``): a bf16 step's stacked weights cost 2 bytes, or
             4 + 2 with ``grad_accum > 1``; pipelined, 4 (the stages run on the fp32 masters:
             their stacked gradient sums the micro-batches, models/pipeline.py) + 4 / R (the
             fp32 gradient of one block that each backward iteration stacks before adding it);
* optimizer  AdamW: mu + nu in fp32 (8 bytes/element); Adafactor: factored second moment
             (rows + cols per matrix) and no first moment;
* weight copies every fp32 master kernel cast to ``model.dtype`` when that differs: XLA hoists
             the casts out of the layer scan and the micro-batch loop and keeps all layers';
* activations for one micro-batch (``train.batch_size / grad_accum`` rows split over
             data × fsdp × expert; DPO's policy sees chosen + rejected), by ``model.remat``:
             the residuals saved for the backward (none = everything a layer computes, norm
             inputs, q/k/v, attention output, MLP gate/up/act/product, residuals, plus
             ``attention=xla``'s fp32 probabilities; dots_saveable = projection outputs; full =
             the layer input) for every layer, plus the larger of one layer's activations and
             their gradients (its backward) and one loss chunk's fp32 logits + their gradient in
             ``model.dtype`` (see :func:`activation_bytes`). ``attention=auto`` is planned as the
             TPU/GPU flash kernels (no ``[T, T]`` buffers); on CPU it is ``xla``: say so;
* temporaries the transients of the layer being computed: a MoE layer's dispatch (fp32 router
             logits/probs, top-k and sort indices, the token copy sorted by expert, the
             scatter-add accumulator) and, with quantized or non-``dtype`` weights, the largest
             weight dequantized/cast to ``model.dtype`` (one at a time);
* load/init  the peak while the checkpoint streams in and the train state is initialised
             (medjax/hf/load.py, training/setup.py): params + optimizer moments (created by a
             jitted init with out_shardings) + the largest tensor's block in flight. ``host``
             is one process's RAM in flight for the load: the largest block (target dtype) plus
             the bounded raw chunk being read into it, or for a quantized tensor its
             codes/scales plus the bounded column chunk being quantized (a stacked weight: one
             layer's). Not counted: the runtime's own memory (compiled programs, the
             compiler's transients, the allocator): 3-12% of the QLoRA load measured in
             tests/hf/test_load_memory.py (docs/SCALE.md).
* host CPU   (``host_cpu=True``, ``--device cpu``) XLA:CPU has no bf16 dot: it converts each
             operand of a ``model.dtype`` matmul to fp32, so one layer's weights (the layer loop
             holds one at a time: ``ops.target.compiler_options``) and the largest weight outside
             the layers (embedding / lm_head) exist in fp32 beside the step; and the arrays share
             the RAM with the runtime, charged as this planner's own high-water mark (Python, JAX,
             medjax and the abstract model: what the trainer holds before its first array).

With pipeline stages (``mesh.stage`` S > 1, ``train.pipeline_repeats`` R, M = ``grad_accum``
micro-batches; medjax/models/pipeline.py) each device holds its stage's ``L / S`` layers (the
rules split ``layers`` over ``stage``) and the embedding and head whole (every stage runs them),
so every stage plans the same bytes; the saved residuals are those of all ``R · M + S − 1``
iterations of its ``L / (R · S)`` layers (all micro-batches are in flight before the backward),
the head's logits those of all M micro-batches. :func:`pipeline_traffic` adds the bubble
fraction and the bytes moved between stages.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from medjax import sharding
from medjax.config import RunConfig
from medjax.errors import ConfigError, UserError

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Plan:
    devices: int
    axis_sizes: dict
    params: float
    grads: float
    optimizer: float
    activations: float
    trainable: int
    total_params: int
    micro_batch_per_device: float
    moe: dict | None = None          # one MoE layer's FLOPs/temporaries (models.moe.moe_layer_cost)
    pipeline: dict | None = None     # stages, bubble, bytes between stages (pipeline_traffic)
    temporaries: float = 0.0
    load_peak: float = 0.0        # per device, while loading + initialising the train state
    host_load: float = 0.0        # per process, RAM beyond its baseline for the tensor in flight
    quantized: float = 0.0        # of ``params``: codes + scales of the quantized kernels
    reference: float = 0.0        # DPO's frozen copy of the trainable weights (``param_dtype``)
    weight_copies: float = 0.0    # every layer's fp32 master kernels cast to ``model.dtype``
    cpu_dot_operands: float = 0.0  # host CPU: fp32 copies of one layer's + the head's weights
    runtime: float = 0.0          # host CPU: the process's own RAM (Python + JAX runtime)

    @property
    def total(self) -> float:
        return (self.params + self.reference + self.grads + self.optimizer + self.weight_copies
                + self.activations + self.temporaries + self.cpu_dot_operands + self.runtime)


# ----------------------------------------------------------------------------- model shapes
def model_config(cfg: RunConfig):
    from medjax.models import ModelConfig, get_preset
    if cfg.model.preset:
        return get_preset(cfg.model.preset)
    path = Path(cfg.model.path)
    config_json = path / "config.json" if path.is_dir() else path
    if config_json.suffix != ".json" or not config_json.is_file():
        raise ConfigError(f"model.path: the planner reads an HF config.json; not found at {path}")
    try:
        return ModelConfig.from_hf_config(json.loads(config_json.read_text()))
    except UserError as e:               # an unsupported architecture or option: name the file
        raise ConfigError(f"{config_json}: {e}") from None


def abstract_model(cfg: RunConfig, model_cfg):
    """Shapes only: the Decoder with LoRA adapters and QLoRA-quantized bases, exactly as the
    trainer builds it, under ``nnx.eval_shape``."""
    from medjax.models import Decoder

    def build():
        model = Decoder(model_cfg, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(cfg.model.param_dtype),
                        dtype=jnp.dtype(cfg.model.dtype), scan_layers=cfg.model.scan_layers)
        from medjax.train.setup import prepare_model
        prepare_model(cfg, model)       # the trainer's wrap → quantize → NEFTune, one copy
        return model
    return nnx.eval_shape(build)


def mesh_devices(mesh_cfg) -> int:
    """The devices a mesh config asks for: the product of its fixed axis sizes (axes left to
    "the rest" count 1), e.g. ``tensor: 4, data: -1`` → 4."""
    return math.prod(getattr(mesh_cfg, a) or 1 for a in sharding.MESH_AXES
                     if (getattr(mesh_cfg, a) or 1) > 0)


def _local_elements(variable, mesh, rules, *, gathered: bool = False) -> tuple[int, int]:
    """(global elements, elements on one device) of an abstract variable; ``gathered``: after
    the all-gather over ``fsdp`` that precedes its use (weights stay split over tensor/expert)."""
    shape = variable.get_value().shape
    logical = variable.get_metadata().get("logical_axes")
    if logical is None:
        return math.prod(shape), math.prod(shape)
    spec = rules.sharding(mesh, tuple(logical), shape, where="plan").spec
    sizes = dict(mesh.shape, fsdp=1) if gathered else mesh.shape
    parts = [sharding._num_shards(sizes, entry) for entry in spec]
    parts += [1] * (len(shape) - len(parts))
    return math.prod(shape), math.prod(d // p for d, p in zip(shape, parts))


def _factored_elements(shape) -> int:
    """Adafactor's second-moment size for one parameter (optax factors dims >= 128)."""
    if len(shape) >= 2 and min(shape[-2:]) >= 128:
        return math.prod(shape[:-2]) * (shape[-2] + shape[-1])
    return math.prod(shape)


# ----------------------------------------------------------------------------- planning
def plan(cfg: RunConfig, num_devices: int | None = None, *, host_cpu: bool = False) -> Plan:
    """Per-device bytes of ``cfg``'s training run; ``num_devices`` defaults to what the mesh asks;
    ``host_cpu``: on this host's CPU (XLA:CPU's fp32 dot operands and the runtime counted)."""
    from medjax.models.stack import num_stacked, split_layer_path
    from medjax.quant import QuantizedArray, QuantizedTensor, STREAM_CHUNK_ELEMENTS
    model_cfg = model_config(cfg)
    num_devices = num_devices or mesh_devices(cfg.mesh)
    sizes = sharding.axis_sizes(cfg.mesh, num_devices)
    sharding.check_model(model_cfg, sizes, cfg.train.pipeline_repeats)
    mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
    rules = sharding.rules_of(cfg.mesh)
    pipelined = sizes["stage"] > 1
    # this device's stacked layer variables (pipeline: its stage's) in the dtype the layers read
    # (fp32 masters cast to model.dtype first)
    layer_bytes = 0.0
    model = abstract_model(cfg, model_cfg)
    trainable_type = nnx.LoRAParam if cfg.lora.enabled else nnx.Param
    compute = jnp.dtype(cfg.model.dtype).itemsize
    file_bytes = _DTYPE_BYTES[cfg.model.param_dtype]        # the checkpoint's dtype, as planned

    params = grads = opt = quantized = reference = copies = 0.0
    trainable = total = 0
    dpo_copy = cfg.train.objective == "dpo" and not cfg.lora.enabled   # dpo.resolve_reference
    in_flight = host = weight_temp = moe_gathered = layer_dot_elements = head_dot_elements = 0.0
    # without an expert axis > 1, a batch split over devices runs each MoE layer per device with
    # its expert weights whole (models/moe_dispatch.py): one layer's are gathered at a time
    moe_whole = sizes["expert"] == 1 and sizes["data"] * sizes["fsdp"] > 1
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, QuantizedArray))):
        in_layer = bool(num_stacked(var)) or split_layer_path(path)[1] is not None
        n_global, n_local = _local_elements(var, mesh, rules)
        itemsize = jnp.dtype(var.get_value().dtype).itemsize
        if num_stacked(var):
            layer_bytes += n_local * (min(compute, 4) if isinstance(var, trainable_type) else itemsize)
        if moe_whole and n_local < n_global and \
                "experts" in (var.get_metadata().get("logical_axes") or ()):
            moe_gathered += n_global * itemsize / (var.get_value().shape[0] if num_stacked(var) else 1)
        if isinstance(var, QuantizedArray):
            params += n_local * itemsize
            quantized += n_local * itemsize
            continue
        total += n_global
        if not isinstance(var, trainable_type):
            params += n_local * itemsize
        else:
            trainable += n_global
            params += 4 * n_local
            if dpo_copy:                                    # objectives.initial_reference
                reference += n_local * itemsize
            if compute != 4 and var.get_value().ndim >= 2 + num_stacked(var):
                # XLA casts the fp32 masters of ALL layers to the compute dtype once, outside the
                # layer scan and the micro-batch loop (loop-invariant), and keeps the copies for
                # the forward, the remat recompute and the backward (v5p buffer assignments:
                # one bf16[L, ...] per stacked kernel; loop layout: the same slope per layer)
                copies += n_local * compute
            # fp32 gradient accumulator; with grad_accum > 1 under the layer scan a second set:
            # the backward scan returns every layer's gradient stacked before it is added in
            # (the loop layout adds each layer's as it is produced: measured slope on v5p)
            # (pipelined: one gradient of all micro-batches, no accumulation loop)
            second = (cfg.train.grad_accum > 1 and not pipelined
                      and (cfg.model.scan_layers or not in_layer))
            if pipelined and num_stacked(var):
                # the backward loop's iteration differentiates the stage's layer scan over its
                # block (L/(R*S) layers): that scan returns the block's fp32 gradients stacked,
                # added into the stage's fp32 carry after it. Compiled Llama-2-70B on v5p-128,
                # stage 4 x fsdp 2 x tensor 4, R = 1, M = 16 (buffer assignment, 2026-12-07):
                # the top of the heap is f32[20,1,...] of every kernel (broadcast_in_dim.889 +
                # the scan's dynamic-update-slices) beside the carry's f32[1,1,20,...]
                grads += 4 * n_local / cfg.train.pipeline_repeats
            if num_stacked(var) and not pipelined and compute < 4:      # masters: fp32
                # the layer scan runs on the weights cast to model.dtype (stack.compute_weights):
                # its stacked gradient is in model.dtype, made fp32 in the update (or added into
                # the fp32 accumulator with grad_accum > 1); the pipeline's stages run on the
                # fp32 masters, their stacked gradient being the micro-batches' fp32 accumulator
                # (models/pipeline.py)
                grads += n_local * (compute + (4 if second else 0))
            else:
                grads += 4 * n_local * (2 if second else 1)
            if cfg.optim.name == "adamw":
                opt += 8 * n_local
            else:
                opt += 4 * _factored_elements(var.get_value().shape) * n_local / max(n_global, 1)
            itemsize = 4
        if isinstance(var, nnx.LoRAParam):
            continue                                        # created by init, never read
        if compute != 4 and var.get_value().ndim >= 2 + num_stacked(var):
            if in_layer:            # all layers' elements here; one layer's below
                layer_dot_elements += n_local
            else:
                head_dot_elements = max(head_dot_elements, n_local)
        # a stacked [L, ...] weight is loaded, and used under the layer scan, one layer at a time
        layers = var.get_value().shape[0] if num_stacked(var) else 1
        in_flight = max(in_flight, n_local * itemsize / layers)
        host = max(host, _host_block(n_local / layers, file_bytes, itemsize))
        if itemsize != compute and var.get_value().ndim >= 2 + num_stacked(var):
            weight_temp = max(weight_temp,
                              _local_elements(var, mesh, rules, gathered=True)[1] * compute / layers)
    expert_codes = 0.0
    for _, q in nnx.iter_modules(model):
        if isinstance(q, QuantizedTensor):
            total += q.n_params
            # the host quantizes a whole weight (one layer of a stacked one), all its columns
            storage = sum(math.prod(getattr(q, n).get_value().shape) *
                          jnp.dtype(getattr(q, n).get_value().dtype).itemsize
                          for n in q.names) / max(q.layers, 1)
            n_in = q.spec.shape[-2]
            chunk = min(q.spec.n_params, max(1, STREAM_CHUNK_ELEMENTS // n_in) * n_in)
            host = max(host, storage + chunk * (file_bytes + 4 + 4 + 4))
            codes_global, codes_used = _local_elements(q.codes, mesh, rules, gathered=True)
            gathered = q.spec.n_params * codes_used / codes_global   # dequantized where used
            # an expert stack is dequantized one expert at a time inside the grouped matmul
            # (quant.QuantizedGroups): one [in, out] matrix with its int32 level indices and
            # fp32 values, not the layer's [E, in, out]
            groups = math.prod(q.spec.shape[:-2])
            weight_temp = max(weight_temp, gathered / groups * (4 + 4 + compute))
            if q.layers and groups > 1:
                # the layer scan's slice of the stacked codes feeds the loop over experts, so
                # XLA materialises it: one layer's codes of every expert stack (compiled 2-layer
                # Mixtral-width QLoRA step on XLA:CPU: three u8[8, 2048, 14336] per layer)
                expert_codes += storage * codes_used / codes_global
    micro, activations = activation_bytes(cfg, model_cfg, sizes)
    moe = None
    if model_cfg.is_moe:
        from medjax.models.moe import moe_layer_cost
        moe = moe_layer_cost(model_cfg, max(1, round(micro * cfg.data.seq_len)),
                             _DTYPE_BYTES[cfg.model.dtype], gathered_weight_bytes=moe_gathered)
        moe.update(expert_parallel_traffic(cfg, model_cfg, sizes, micro))
    temporaries = weight_temp + expert_codes + (moe["temp_bytes"] if moe else 0.0)
    if pipelined and cfg.train.pipeline_repeats > 1:
        # R > 1: the block an iteration picks from the stage's R blocks (a copy; the stage's
        # layers themselves are held in stage order, models/pipeline.LayerOrder: no regrouped
        # copy). Compiled Llama-2-70B on v5p-128, stage 4 x fsdp 2 x tensor 4, M = 16: R = 2
        # 55.72 GiB against R = 1's 54.27 (docs/SCALE.md, 2026-12-07); this term 2.0 GiB
        temporaries += layer_bytes / cfg.train.pipeline_repeats
    pipe = pipeline_traffic(cfg, model_cfg, sizes, micro) if pipelined else None
    cpu_dots = runtime = 0.0
    if host_cpu:
        import resource
        cpu_dots = 4 * (layer_dot_elements / model_cfg.num_layers + head_dot_elements)
        runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Plan(num_devices, sizes, params, grads, opt, activations, trainable, total, micro, moe,
                pipeline=pipe, cpu_dot_operands=cpu_dots, runtime=runtime,
                temporaries=temporaries, load_peak=params + reference + opt + in_flight,
                host_load=host, quantized=quantized, reference=reference, weight_copies=copies)


def _host_block(n_elements: float, file_bytes: int, target_bytes: int) -> float:
    """Host bytes of one block in flight (hf/load.py): the block in its target dtype plus the
    bounded raw read chunk being converted into it."""
    from medjax.hf.load import READ_CHUNK_BYTES
    return n_elements * target_bytes + min(READ_CHUNK_BYTES, n_elements * file_bytes)


def activation_bytes(cfg: RunConfig, m, sizes) -> tuple[float, float]:
    """(micro-batch rows per device, estimated activation bytes per device); see module doc.

    What the compiled step keeps at its peak (measured in XLA's buffer assignments: libtpu for
    llama2-7b / mistral-7b / llama3-8b / llama3-70b recipes, XLA:CPU for tiny models):

    * ``saved``   the residuals the backward reads, one per layer and token, by ``model.remat``
                  (full: the layer input, stacked ``[L, B, T, H]`` by the layer scan);
    * ``working`` one layer's complete set while it is (re)computed and differentiated: its
                  activations and the gradients with respect to them (twice the set);
    * ``logits``  one loss chunk's fp32 logits (log-softmax and its gradient overwrite them) and
                  their gradient cast to ``model.dtype`` for the lm_head backward: the loss runs
                  the head ``loss_chunk`` tokens of every row at a time (``Decoder.token_nll``).

    The head's buffers are freed before the layers' backward starts, so the peak holds
    ``saved`` plus the larger of ``working`` and ``logits``, not both. DPO runs the policy on
    the chosen and the rejected row of each pair (twice the sequences).

    Pipelined (``mesh.stage`` S > 1): ``saved`` holds all ``R · M + S − 1`` iterations of the
    stage's ``L / (R · S)`` layers (with ``model.remat``: one stage input per iteration plus one
    stage's residuals, models/pipeline.py), ``logits`` all M micro-batches, plus the embeddings / stage
    outputs of the M micro-batches (``[M, B, T, H]``): the backward loop carries its gradient
    only (the head read the buffer before the loop; the stage inputs are saved apart)."""
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    rows = cfg.train.batch_size / cfg.train.grad_accum / shards
    tokens = rows * cfg.data.seq_len * (2 if cfg.train.objective == "dpo" else 1)
    t = sizes["tensor"]
    s = _DTYPE_BYTES[cfg.model.dtype]
    H, q, kv, inner = m.hidden_size, m.num_heads * m.head_dim / t, m.num_kv_heads * m.head_dim / t, \
        m.intermediate_size / t
    k = m.num_experts_per_tok if m.is_moe else 1
    mlp_dots = k * (2 * inner) + (k * H if m.is_moe else H)        # gate, up (+ per-expert down)
    proj_dots = q + 2 * kv + H                                      # q, k, v, o
    dots = proj_dots + mlp_dots
    mlp = mlp_dots + k * 2 * inner + (k * 2 * H if m.is_moe else 0)   # + act, product (+ rows)
    everything = proj_dots + 4 * H + (q + kv) + q + mlp               # + norms, residuals, rope
    # a MoE layer's own backward buffers are the planner's MoE temporaries (moe_layer_cost)
    in_working = everything - (mlp if m.is_moe else 0)
    probs = 0.0
    if cfg.model.attention == "xla":
        # ops/xla_attention.py saves the fp32 probabilities of the query blocks it computes
        # (keys up to each block's end) for its backward, which adds a dS of the same size
        from medjax.ops.xla_attention import causal_blocks
        T = cfg.data.seq_len
        visible = sum((e - b) * e for b, e in causal_blocks(T))
        probs = tokens / T * (m.num_heads / t) * visible * 4
    # one layer's activations + their grads; a dense layer's MLP elementwise buffers count once
    # (since Linear's weight gradient is a 2-D matmul, XLA no longer keeps a transposed copy of
    # the SwiGLU backward beside it: compiled tiny Llama at remat=full, 1.20x -> 1.03-1.04x)
    # LoRA: the adapters' backward reads each adapted projection's input (their dA = xᵀ·dh), kept
    # beside the recomputed set: the dense MLP's elementwise set counts twice again, and a MoE
    # layer keeps its routed rows' expert inputs ([N·k, H] for gate/up, [N·k, inner] for down)
    # (compiled tiny Llama / Mixtral, LoRA r8 on all seven projections, remat=full: 0.90 / 0.86
    # without these terms)
    lora = cfg.lora.enabled
    working = (2 * in_working - (0 if m.is_moe or lora else mlp)
               + (k * (H + inner) if m.is_moe and lora else 0)) * tokens * s + 2 * probs
    remat = cfg.model.remat
    stages, micro = sizes.get("stage", 1), cfg.train.grad_accum
    layers, buffers = m.num_layers, 0.0
    if stages > 1:
        from medjax.models.pipeline import iterations
        repeats = cfg.train.pipeline_repeats
        layers = iterations(stages, repeats, micro) * m.num_layers / (repeats * stages)
        buffers = micro * tokens * H * s
    if remat == "none":
        saved = layers * (tokens * everything * s + probs)
    elif remat == "dots_saveable":
        saved = layers * tokens * (dots + H) * s
    else:
        saved = layers * tokens * H * s
    if stages > 1 and remat != "none":
        # each stage call is checkpointed whole: one stage input per iteration, and one
        # stage's layers' residuals while that stage is recomputed
        per_stage = m.num_layers / (cfg.train.pipeline_repeats * stages)
        saved = saved / layers * per_stage + iterations(
            stages, cfg.train.pipeline_repeats, micro) * tokens * H * s
    # the loss computes the head chunk by chunk (models/decoder.py Decoder.token_nll)
    from medjax.models.decoder import loss_chunk
    chunk_share = loss_chunk(cfg.data.seq_len, m.vocab_size) / cfg.data.seq_len
    logits = tokens * chunk_share * (m.vocab_size / t) * (4 + s) * (micro if stages > 1 else 1)
    return rows, saved + buffers + max(working, logits)


def pipeline_traffic(cfg: RunConfig, m, sizes, micro_rows: float) -> dict:
    """The pipeline's bubble and the bytes one device sends to other stages per optimizer step
    (medjax/models/pipeline.py): every iteration each stage passes its micro-batch's activations
    ``[B, T, H]`` (its rows) to the next stage with a collective-permute, and the backward sends
    their gradient back (``ppermute_bytes``); the last stage's output also goes to every stage
    (the buffer the head and stage 0 read, ``last_stage_bytes``, forward and backward). No
    weight moves between stages, with ``R > 1`` either: the train state holds the layers in
    stage order (``pipeline.LayerOrder``; before, the step regrouped them with all-to-alls of
    3.39 GiB per device and step for Llama-2-7B on v5p-16, stage 4 x fsdp 2, R = 2)."""
    from medjax.models.pipeline import bubble_fraction, iterations
    S, R, M = sizes["stage"], cfg.train.pipeline_repeats, cfg.train.grad_accum
    activation = micro_rows * cfg.data.seq_len * m.hidden_size * _DTYPE_BYTES[cfg.model.dtype]
    if cfg.train.objective == "dpo":
        activation *= 2
    steps = iterations(S, R, M)
    return {"stages": S, "repeats": R, "micro_batches": M, "iterations": steps,
            "bubble": bubble_fraction(S, R, M), "layers_per_stage": m.num_layers // S,
            "ppermute_bytes": 2 * steps * activation,
            "last_stage_bytes": 2 * steps * activation}


def expert_parallel_traffic(cfg: RunConfig, m, sizes, micro_rows: float) -> dict:
    """All-to-all bytes one device sends per optimizer step under expert parallelism
    (medjax/models/moe_dispatch.py), for both transports: per MoE layer and micro-batch the rows
    go out and the results come back in the forward, again in the backward (the transposed
    all-to-alls), and once more when ``model.remat`` recomputes the layer. Also the MoE
    temporaries of that layout (its receive buffer holds ``ep · C`` rows; moe_dispatch.py)."""
    from medjax.models.moe_dispatch import all_to_all_bytes, expert_parallel_temp_bytes
    ep = sizes["expert"]
    if ep <= 1:
        return {}
    tokens = max(1, round(micro_rows * cfg.data.seq_len))
    passes = 2 + (cfg.model.remat != "none")
    per_step = m.num_layers * cfg.train.grad_accum * passes
    dtype = _DTYPE_BYTES[cfg.model.dtype]
    out = {"expert_parallel": ep, "temp_bytes": expert_parallel_temp_bytes(
        tokens, m.hidden_size, m.intermediate_size, m.num_experts_per_tok, m.num_experts, ep, dtype)}
    for transport in ("ragged", "padded"):
        out[f"all_to_all_{transport}_bytes"] = per_step * all_to_all_bytes(
            tokens, m.hidden_size, m.num_experts_per_tok, m.num_experts, ep,
            dtype, transport)
    return out
