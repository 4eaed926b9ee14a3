"""Memory planner: per-device bytes of a training run, from shapes alone (``jax.eval_shape``).

    python -m medjax.plan --config FILE [key=value ...] [--device h100|h200|a100|v5p|v5e|v4|v6e[-N]]
                          [--device-memory 80GB] [--num-devices N] [--compile]

``--compile`` asks the real TPU / GPU compiler instead (medjax/plan_compile.py).

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
             accumulator after it; the loop layout adds each layer's as it is made);
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
             their gradients (its backward) and the head's fp32 logits + their gradient in
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
Device sizes in GiB (2**30 bytes); ``--device-memory`` accepts GB (1e9) or GiB. A warning is
printed when the total passes 90% of device memory (XLA needs room for temporaries).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from medjax import sharding
from medjax.config import ConfigError, RunConfig, load_config

GiB = 2 ** 30
DEVICES_GIB = {"h100": 80, "h200": 141, "a100": 80, "a100-40": 40, "v4": 32, "v5e": 16,
               "v5p": 95, "v6e": 32}
# TPU slice names count TensorCores for v4/v5p (2 per chip = 1 JAX device) and chips for v5e/v6e.
_CORES_PER_DEVICE = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.9


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
    temporaries: float = 0.0
    load_peak: float = 0.0        # per device, while loading + initialising the train state
    host_load: float = 0.0        # per process, RAM beyond its baseline for the tensor in flight
    quantized: float = 0.0        # of ``params``: codes + scales of the quantized kernels
    reference: float = 0.0        # DPO's frozen copy of the trainable weights (``param_dtype``)
    weight_copies: float = 0.0    # every layer's fp32 master kernels cast to ``model.dtype``

    @property
    def total(self) -> float:
        return (self.params + self.reference + self.grads + self.optimizer + self.weight_copies
                + self.activations + self.temporaries)


def parse_memory(text: str) -> float:
    """'80GB' → 80e9, '80GiB' → 80*2**30, '512MiB', '1.5TB'; a bare number is GiB."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--device-memory {text!r}: expected e.g. 80GB or 96GiB")
    value, unit = float(m.group(1)), (m.group(2) or "GiB").upper()
    power = "KMGT".index(unit[0]) + 1
    return value * ((2 ** (10 * power)) if "I" in unit else 10 ** (3 * power))


def parse_device(name: str) -> tuple[str, float, int | None]:
    """'v5p-64' → ('v5p', bytes per device, 32 devices); 'h100' → ('h100', bytes, None);
    'cpu' → this host's RAM as one device (JAX on CPU keeps every array in host memory)."""
    if name.lower() == "cpu":
        return "cpu", float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), 1
    m = re.fullmatch(r"(h100|h200|a100-40|a100|v4|v5e|v5litepod|v5p|v6e)(?:-(\d+))?", name.lower())
    if not m:
        raise ConfigError(f"--device {name!r}: known {sorted(DEVICES_GIB)} (TPUs may add a slice "
                         f"size, e.g. v5p-64)")
    kind = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    count = None
    if m.group(2):
        if kind not in _CORES_PER_DEVICE:
            raise ConfigError(f"--device {name!r}: give GPU counts with --num-devices")
        count = int(m.group(2)) // _CORES_PER_DEVICE[kind]
    return kind, DEVICES_GIB[kind] * GiB, count


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
    except ValueError as e:
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
def plan(cfg: RunConfig, num_devices: int | None = None) -> Plan:
    """Per-device bytes of ``cfg``'s training run; ``num_devices`` defaults to what the mesh asks."""
    from medjax.models.stack import num_stacked, split_layer_path
    from medjax.quant import QuantizedArray, QuantizedTensor, STREAM_CHUNK_ELEMENTS
    model_cfg = model_config(cfg)
    num_devices = num_devices or mesh_devices(cfg.mesh)
    sizes = sharding.axis_sizes(cfg.mesh, num_devices)
    sharding.check_model(model_cfg, sizes)
    mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
    rules = sharding.rules_for(cfg.mesh.preset)
    model = abstract_model(cfg, model_cfg)
    trainable_type = nnx.LoRAParam if cfg.lora.enabled else nnx.Param
    compute = jnp.dtype(cfg.model.dtype).itemsize
    file_bytes = _DTYPE_BYTES[cfg.model.param_dtype]        # the checkpoint's dtype, as planned

    params = grads = opt = quantized = reference = copies = 0.0
    trainable = total = 0
    dpo_copy = cfg.train.objective == "dpo" and not cfg.lora.enabled   # dpo.resolve_reference
    in_flight = host = weight_temp = moe_gathered = 0.0
    # without an expert axis > 1, a batch split over devices runs each MoE layer per device with
    # its expert weights whole (models/moe_dispatch.py): one layer's are gathered at a time
    moe_whole = sizes["expert"] == 1 and sizes["data"] * sizes["fsdp"] > 1
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, QuantizedArray))):
        in_layer = bool(num_stacked(var)) or split_layer_path(path)[1] is not None
        n_global, n_local = _local_elements(var, mesh, rules)
        itemsize = jnp.dtype(var.get_value().dtype).itemsize
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
            second = cfg.train.grad_accum > 1 and (cfg.model.scan_layers or not in_layer)
            grads += 4 * n_local * (2 if second else 1)
            if cfg.optim.name == "adamw":
                opt += 8 * n_local
            else:
                opt += 4 * _factored_elements(var.get_value().shape) * n_local / max(n_global, 1)
            itemsize = 4
        if isinstance(var, nnx.LoRAParam):
            continue                                        # created by init, never read
        # a stacked [L, ...] weight is loaded, and used under the layer scan, one layer at a time
        layers = var.get_value().shape[0] if num_stacked(var) else 1
        in_flight = max(in_flight, n_local * itemsize / layers)
        host = max(host, _host_block(n_local / layers, file_bytes, itemsize))
        if itemsize != compute and var.get_value().ndim >= 2 + num_stacked(var):
            weight_temp = max(weight_temp,
                              _local_elements(var, mesh, rules, gathered=True)[1] * compute / layers)
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
            weight_temp = max(weight_temp, gathered * (4 + compute))
    micro, activations = activation_bytes(cfg, model_cfg, sizes)
    moe = None
    if model_cfg.is_moe:
        from medjax.models.moe import moe_layer_cost
        moe = moe_layer_cost(model_cfg, max(1, round(micro * cfg.data.seq_len)),
                             _DTYPE_BYTES[cfg.model.dtype], gathered_weight_bytes=moe_gathered)
        moe.update(expert_parallel_traffic(cfg, model_cfg, sizes, micro))
    temporaries = weight_temp + (moe["temp_bytes"] if moe else 0.0)
    return Plan(num_devices, sizes, params, grads, opt, activations, trainable, total, micro, moe,
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
    * ``logits``  the fp32 logits (log-softmax and its gradient overwrite them) and the gradient
                  cast to ``model.dtype`` for the lm_head backward.

    The head's buffers are freed before the layers' backward starts, so the peak holds
    ``saved`` plus the larger of ``working`` and ``logits``, not both. DPO runs the policy on
    the chosen and the rejected row of each pair (twice the sequences)."""
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
    working = 2 * tokens * in_working * s + 2 * probs   # one layer's activations + their grads
    remat = cfg.model.remat
    if remat == "none":
        saved = m.num_layers * (tokens * everything * s + probs)
    elif remat == "dots_saveable":
        saved = m.num_layers * tokens * (dots + H) * s
    else:
        saved = m.num_layers * tokens * H * s
    logits = tokens * (m.vocab_size / t) * (4 + s)
    return rows, saved + max(working, logits)


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


# ----------------------------------------------------------------------------- report
def report(cfg: RunConfig, p: Plan, device_name: str | None, device_bytes: float | None) -> str:
    g = lambda b: f"{b / GiB:9.2f}"  # noqa: E731
    mesh = " ".join(f"{a}={p.axis_sizes[a]}" for a in sharding.MESH_AXES)
    where = f"{p.devices} × {device_name or 'device'}" + (
        f" ({device_bytes / GiB:.1f} GiB each)" if device_bytes else "")
    what = cfg.model.preset or cfg.model.path
    lora = f", LoRA r={cfg.lora.rank}" + (f" {cfg.lora.quantize}" if cfg.lora.quantize else "") \
        if cfg.lora.enabled else ""
    lines = [
        f"medjax.plan: {what}{lora} · mesh {cfg.mesh.preset} [{mesh}] · {where}",
        f"  {p.total_params:,} params, {p.trainable:,} trainable · optimizer {cfg.optim.name} · "
        f"remat {cfg.model.remat} · attention {cfg.model.attention}",
        f"  micro-batch {p.micro_batch_per_device:g} rows × {cfg.data.seq_len} tokens per device "
        f"(batch {cfg.train.batch_size}, grad_accum {cfg.train.grad_accum})",
        "  per device               GiB",
        f"  params               {g(p.params)}",
        *([f"  reference (DPO)      {g(p.reference)}"] if p.reference else []),
        f"  grads                {g(p.grads)}",
        f"  optimizer state      {g(p.optimizer)}",
        *([f"  weight copies        {g(p.weight_copies)}   (fp32 masters cast to "
           f"{cfg.model.dtype})"] if p.weight_copies else []),
        f"  activations (est.)   {g(p.activations)}",
        f"  temporaries (est.)   {g(p.temporaries)}",
        f"  total                {g(p.total)}",
        f"  load/init peak       {g(p.load_peak)}   (host RAM in flight per process: "
        f"{p.host_load / GiB:.2f} GiB)",
    ]
    if p.moe:
        lines.append(f"  MoE layer fwd+bwd per micro-batch: {p.moe['active_flops'] / 1e12:.3g} TFLOP "
                     f"active, <= {p.moe['max_flops'] / 1e12:.3g} with block padding "
                     f"({p.moe['block_rows']}-row blocks); temporaries ~"
                     f"{p.moe['temp_bytes'] / GiB:.2f} GiB")
        if p.moe.get("expert_parallel"):
            lines.append(f"  all-to-all per step per device (expert={p.moe['expert_parallel']}): "
                         f"{p.moe['all_to_all_ragged_bytes'] / GiB:.3g} GiB ragged (GPU/TPU), "
                         f"{p.moe['all_to_all_padded_bytes'] / GiB:.3g} GiB padded (CPU)")
    if p.quantized:
        lines.insert(5, f"    of which quantized {g(p.quantized)}   ({cfg.lora.quantize} codes + scales)")
    if device_bytes:
        frac = p.total / device_bytes
        if frac > 1:
            if p.params + p.grads + p.optimizer > device_bytes:
                hint = ("split the state over more devices (fsdp/tensor/expert), train LoRA, or "
                        "use adafactor")
            else:
                hint = "enable model.remat, or raise train.grad_accum to shrink the micro-batch"
            lines.append(f"  WARNING: needs {frac:.0%} of device memory — will not fit; {hint}")
        elif frac > HEADROOM:
            lines.append(f"  WARNING: uses {frac:.0%} of device memory (> {HEADROOM:.0%}); XLA "
                         f"temporaries may not fit")
        else:
            lines.append(f"  fits: {frac:.0%} of device memory")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options (a function, so other planners can add theirs, e.g. ``--compile``)."""
    ap = argparse.ArgumentParser(prog="python -m medjax.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append",
                    help="run config YAML (model, mesh, train, data, lora, optim); repeat to overlay")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.preset=fsdp")
    ap.add_argument("--device", help="h100 | h200 | a100 | a100-40 | v4 | v5e | v5p | v6e | cpu (host RAM); TPU "
                                     "slices may add their size (v5p-64 = 32 chips)")
    ap.add_argument("--device-memory", help="memory per device, e.g. 80GB or 96GiB (overrides --device)")
    ap.add_argument("--num-devices", type=int, help="devices in the mesh (default: from --device "
                                                    "slice size, else the devices the config's mesh "
                                                    "asks for: the product of its fixed axis sizes)")
    ap.add_argument("--serve", action="store_true",
                    help="print the KV pages python -m medjax.serve fits beside Llama-3-8B on one "
                         "H100 and on one v5e chip (no config needed)")
    ap.add_argument("--compile", action="store_true",
                    help="also compile the real train step for --device (compile-only TPU/GPU, "
                         "needs the tpu/cuda extra; see medjax/plan_compile.py)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:      # the serving planner's lines (medjax/serve/plan.py)
        from medjax.serve.plan import kv_pages_report
        return print(kv_pages_report({d: DEVICES_GIB[d] * GiB for d in ("h100", "v5e")}, HEADROOM)) or 0
    if args.compile:
        return _compile(args)
    cfg = load_config(args.config, args.overrides)                 # ConfigError: one line, exit 2
    name, device_bytes, count = parse_device(args.device) if args.device else (None, None, None)
    if args.device_memory:
        device_bytes = parse_memory(args.device_memory)
    p = plan(cfg, args.num_devices or count)
    print(report(cfg, p, args.device and args.device.lower(), device_bytes))
    return 1 if device_bytes and max(p.total, p.load_peak) > device_bytes else 0


def _compile(args) -> int:
    """``--compile``: medjax.plan_compile asks libtpu / XLA:GPU about the real train step."""
    from medjax import plan_compile
    if not args.device:
        raise ConfigError("--compile needs --device (e.g. v5p-64, or h100 --num-devices 8)")
    cfg = load_config(args.config, args.overrides)
    memory = parse_memory(args.device_memory) if args.device_memory else None
    kind, _, slice_count = parse_device(args.device)
    return plan_compile.run(cfg, kind, args.num_devices or slice_count or 1, memory,
                            model_cfg=model_config(cfg), estimate_fn=lambda n: plan(cfg, n))


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
