"""The planner's report: :class:`~medjax.plan.accounting.Plan` as the table ``python -m medjax.plan`` prints.

Device sizes in GiB (2**30 bytes). A warning is printed when the total passes 90% of device
memory (XLA needs room for temporaries)."""
from __future__ import annotations

from medjax import sharding
from medjax.config import RunConfig
from medjax.ops.hardware import GiB
from medjax.plan.accounting import Plan

HEADROOM = 0.9


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
        *([f"  fp32 dot operands    {g(p.cpu_dot_operands)}   (XLA:CPU has no {cfg.model.dtype} "
           f"dot: one layer's weights + the head in fp32)"] if p.cpu_dot_operands else []),
        *([f"  host process         {g(p.runtime)}   (Python + JAX runtime: this planner's "
           f"own peak RSS)"] if p.runtime else []),
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
    if p.pipeline:
        q = p.pipeline
        lines.append(f"  pipeline: {q['stages']} stages x {q['repeats']} repeats, "
                     f"{q['layers_per_stage']} layers per stage (embedding and head on every stage, "
                     f"so each stage holds the bytes above), {q['micro_batches']} micro-batches, "
                     f"{q['iterations']} iterations: bubble {q['bubble']:.1%} = (S-1)/(R*M+S-1)")
        lines.append(f"  between stages per step per device: ppermute {q['ppermute_bytes'] / GiB:.3g} "
                     f"GiB (activations fwd + grads bwd), last stage to all "
                     f"{q['last_stage_bytes'] / GiB:.3g} GiB")
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
