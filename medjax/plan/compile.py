"""Ask the real TPU / GPU compiler about a training run, from a CPU host (``plan --compile``).

    python -m medjax.plan --config F --device v5p-64 --compile
    python -m medjax.plan --config F --device h100 --num-devices 8 --compile

The run's jitted train step — built by the same code training uses (``medjax.train``) — is
lowered with abstract inputs (``jax.ShapeDtypeStruct`` carrying their shardings) on
compile-only devices from ``jax.experimental.topologies`` and compiled by libtpu (TPU) or XLA's
GPU pipeline (CUDA). Nothing is allocated. Reported per device:

* XLA's argument, output and temp bytes; total = argument + output - aliased (the donated train
  state) + temp, against the chip's HBM, beside ``medjax.plan``'s estimate. On TPU the total is
  libtpu's ``peak_memory_in_bytes`` instead: its ``temp_size_in_bytes`` counts more than the
  buffer assignment allocates (Meditron on v5p-16: 32.0 GiB against a 20.7 GiB temp block) and
  its own HBM check agrees with the peak (a step whose arguments + temp exceeded a v5e's HBM
  compiled; one layer deeper, the refusal named the peak);
* TPU: compiled FLOPs per step against the model FLOPs (6·N per token trained, 4·N per token
  through a frozen LoRA base, plus causal attention). ``cost_analysis`` counts a loop body
  once, so the micro-batch scan's FLOPs are multiplied by ``train.grad_accum`` (the optimizer
  update, outside the loop, is a negligible overcount); with ``model.scan_layers`` the layer
  scan's body is counted once too, so FLOPs and ``optimal_seconds`` are scaled by the model's
  FLOPs with all layers over those with one. Measured on a tiny Llama (v5e, 2026-11-30): with
  XLA attention a scan's count (one body) equals the loop's at one layer; the cost estimates of
  Mosaic kernels inside the layer scan are not counted, so with Pallas attention the scaled
  figure is low by the attention kernels' share. The loss's head runs in a loop over chunks of
  tokens (``Decoder.token_nll``), counted once: the head matmuls of the other chunks
  (:func:`loss_loop_flops`) are added to the count before the micro-batch and layer-scan
  scaling (the scan's ratio is of model FLOPs with the whole head; pipelined, the head runs
  once on all micro-batches outside the pipeline, so they are added unscaled), and
  ``optimal_seconds`` scaled alike. The Pallas kernels
  count by the cost estimates they declare; remat recomputation shows up as a ratio above 1;
* an estimated step time, a LOWER BOUND: the compiler's ``optimal_seconds`` (TPU) times the
  trip count, else a roofline from FLOPs and peak bf16 throughput.

The compile-only TPU needs libtpu (``make tpu-venv``), the GPU one the CUDA jaxlib plugin
(``make cuda-venv``); each lives in its own venv. ``TPU_SKIP_MDS_QUERY=1`` is forced here so
libtpu never asks a cloud metadata server for its configuration, and jax stays on the CPU; the
host facts libtpu would otherwise warn about come from ``ops/pallas/tpu_compile.py``; the
chips (HBM, peak FLOPs, bandwidth, topologies) from ``ops/hardware.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re

from medjax.errors import ConfigError
from medjax.ops.hardware import CHIPS, GiB, Chip, host_cpu
from medjax.ops.pallas.tpu_compile import topology_devices, use_compile_only_libtpu

use_compile_only_libtpu()       # before libtpu can be loaded: no metadata server, no host warnings

# Torus shapes by chip count (what a slice of that size is built as).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}


# ----------------------------------------------------------------------------- devices
def gpu_target_config(chip: Chip) -> str:
    """XLA's GpuTargetConfigProto (text) for a Hopper GPU: the facts the compiler needs."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {int(chip.hbm_bandwidth)} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {chip.hbm_bytes}
  shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 }}
device_description_str: "{chip.name}"
"""


def _require(module: str, extra: str, what: str):
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs the '{extra}' extra ({module} is not installed): "
                               f"`make {extra}-venv` and run with .venv-{extra}/bin/python "
                               f"(or pip install 'medjax[{extra}]' in a venv of its own)")


def compile_devices(kind: str, count: int):
    """``(chip, devices)``: ``count`` compile-only devices of ``kind`` (v5p, h100, ...), or this
    host's own CPU devices for ``cpu``."""
    import jax
    if kind == "cpu":
        devices = jax.devices("cpu")
        if not 1 <= count <= len(devices):
            raise ConfigError(f"--device cpu --num-devices {count}: this process has {len(devices)} "
                              f"CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        return host_cpu(), devices[:count]
    targets = sorted(k for k, c in CHIPS.items() if c.compile_only)
    if kind not in targets:
        raise ConfigError(f"--compile --device {kind}: unknown chip to compile for; known {targets}")
    chip = CHIPS[kind]
    if chip.platform == "tpu":
        shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
        if count not in shapes:
            raise ConfigError(f"--device {kind} with {count} chips: unknown topology; "
                                   f"known chip counts {sorted(shapes)}")
        _require("libtpu", "tpu", f"--compile --device {kind}")
    else:
        if count < 1 or count > 8:
            raise ConfigError(f"--device {kind} --num-devices {count}: unknown topology; "
                                   f"compile-only GPU topologies are one host of 1-8 GPUs")
        _require("jax_cuda12_plugin", "cuda", f"--compile --device {kind}")
    jax.config.update("jax_platforms", "cpu")     # the host runs on CPU; targets are compile-only
    from jax.experimental import topologies
    if chip.platform == "tpu":
        name = f"{chip.topology_prefix}:{shapes[count]}"
        devices = topology_devices(name)
    else:
        devices = topologies.get_topology_desc(
            platform="cuda", topology_name=chip.topology_prefix, topology=f"1x1x{count}",
            target_config=gpu_target_config(chip)).devices
    return chip, list(devices)


# ----------------------------------------------------------------------------- the step
def abstract_step(cfg, mesh, model_cfg):
    """``(jitted_step, abstract_args)``: the step training runs, built by the trainer's own
    ``training.setup.build_trainable(..., abstract=True)`` (LoRA, QLoRA quantization, NEFTune,
    split, optimizer, objective, shardings) on a shape-only model, and ShapeDtypeStructs carrying
    the shardings training uses to lower it on."""
    import jax.numpy as jnp
    from flax import nnx

    from medjax.models import Decoder
    from medjax.train.setup import build_trainable
    model = nnx.eval_shape(lambda: Decoder(
        model_cfg, rngs=nnx.Rngs(cfg.train.seed), dtype=jnp.dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype), attention_impl=cfg.model.attention,
        remat=cfg.model.remat, scan_layers=cfg.model.scan_layers))
    t = build_trainable(cfg, model, mesh, abstract=True)
    return t.step_fn, (t.state, t.frozen, t.reference,
                       t.batch_spec(cfg.train.batch_size, cfg.data.seq_len))


def model_flops(cfg, model_cfg, trainable: int, total: int) -> dict:
    """Model FLOPs per optimizer step (all devices): matmuls and attention, forward+backward."""
    m = model_cfg
    tokens = cfg.train.batch_size * cfg.data.seq_len
    dpo = cfg.train.objective == "dpo"
    if dpo:
        tokens *= 2                                              # chosen + rejected
    H, D, L = m.hidden_size, m.head_dim, m.num_layers
    experts = m.num_experts_per_tok if m.is_moe else 1
    attn_proj = H * (m.num_heads + 2 * m.num_kv_heads) * D + m.num_heads * D * H
    mlp = experts * 3 * H * m.intermediate_size + (H * m.num_experts if m.is_moe else 0)
    dense = L * (attn_proj + mlp) + H * m.vocab_size             # per token, weights touched
    base_trainable = not cfg.lora.enabled
    # forward 2P; backward 2P for activations + 2P for weights (only when the base trains)
    matmul = tokens * 2 * dense * (3 if base_trainable else 2)
    adapters = 0 if base_trainable else tokens * 6 * trainable * min(1.0, dense / max(total, 1))
    reference = tokens * 2 * dense if dpo else 0                  # frozen DPO reference forward
    attention = tokens * 3 * L * 2 * cfg.data.seq_len * m.num_heads * D   # causal: half of 4·T·H·D
    return {"matmul": matmul + adapters + reference, "attention": attention}


def compile_plan(cfg, kind: str, count: int, hbm_bytes: float | None = None, *, model_cfg,
                 estimate_fn) -> dict:
    """Compile ``cfg``'s train step for ``count`` × ``kind``; numbers per device (see module doc)
    and the compiled step's HLO text (``hlo_text``).
    ``model_cfg`` is the run's ModelConfig and ``estimate_fn(n)`` ``medjax.plan``'s estimate for
    n devices, both passed in by ``medjax.plan`` (this module does not import its caller)."""
    import jax
    from medjax import sharding
    chip, devices = compile_devices(kind, count)
    if hbm_bytes:                                  # --device-memory: judge against this instead
        chip = dataclasses.replace(chip, hbm_bytes=int(hbm_bytes))
    n = len(devices)
    estimate = estimate_fn(n)
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    compiled, args, seconds = _compile_step(cfg, mesh, model_cfg, chip, kind, n)
    hlo_text = compiled.as_text()
    kernels = _kernel_counts(hlo_text)
    sharded = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                  for x in jax.tree.leaves(args))
    mem = compiled.memory_analysis()
    total, peak = _compiled_total(mem, chip)
    host_process = 0
    if chip.platform == "cpu":
        # the arrays share the host's RAM with the Python + JAX runtime and the compiler: this
        # process's own high-water mark (it built and compiled the step, holding no weights)
        import resource
        host_process = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        total += host_process
    cost = _cost(compiled)
    accum = cfg.train.grad_accum
    flops = model_flops(cfg, model_cfg, estimate.trainable, estimate.total_params)
    out = dict(chip=chip, devices=n, kind=kind, compile_seconds=seconds, estimate=estimate,
               argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes,
               alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes, total=total, peak=peak,
               host_process=host_process,
               sharded_arguments=sharded,
               model_matmul_flops=flops["matmul"] / n, model_attention_flops=flops["attention"] / n,
               kernels=kernels, grad_accum=accum, hlo_text=hlo_text,
               compiled_flops=None, optimal_seconds=None)
    if cost:
        out["layer_scan_scale"] = _layer_scan_scale(cfg, model_cfg, estimate, flops)
        scale = accum * out["layer_scan_scale"]
        out["counted_flops"] = float(cost.get("flops", 0.0))      # every loop body once
        out["loss_loop_flops"] = loss_loop_flops(cfg, model_cfg) / n
        # the other head chunks of one micro-batch complete the count to one layer and the whole
        # head, what the layer scan's ratio scales (model FLOPs all layers / one, whole head)
        out["compiled_flops"] = (out["counted_flops"] + out["loss_loop_flops"] / accum) * scale
        if cfg.mesh.stage > 1:
            out["pipeline_rows"] = _pipeline_rows(cfg, model_cfg, mesh, chip, kind, n, out)
            out["compiled_flops"] = out["pipeline_rows"][0]["flops"]
        scale = out["compiled_flops"] / max(out["counted_flops"], 1.0)
        if cost.get("optimal_seconds", 0) > 0:
            out["optimal_seconds"] = float(cost["optimal_seconds"]) * scale
    model_total = out["model_matmul_flops"] + out["model_attention_flops"]
    out["roofline_seconds"] = (max(out["compiled_flops"] or 0.0, model_total) / chip.bf16_flops
                               if chip.bf16_flops else None)
    return out


def _compile_step(cfg, mesh, model_cfg, chip, kind: str, n: int):
    """``(compiled, abstract_args, seconds)``: ``cfg``'s train step compiled for ``mesh``; XLA's
    out-of-memory at compile time is one ConfigError line."""
    import time

    from medjax.ops.pallas.tpu_compile import target_chip
    t0 = time.perf_counter()
    with target_chip(kind) if chip.platform == "tpu" else contextlib.nullcontext():
        step, args = abstract_step(cfg, mesh, model_cfg)
        lowered = step.lower(*args)
        try:
            compiled = lowered.compile()
        except Exception as e:
            raise _oom_error(e, chip, kind, n) from e
    return compiled, args, time.perf_counter() - t0


def _cost(compiled) -> dict:
    """``compiled.cost_analysis()`` as one dict (some versions wrap it in a list; {} when none)."""
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def _compiled_total(mem, chip) -> tuple[int, int]:
    """``(total, peak)`` bytes per device of a compiled step's memory analysis."""
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    peak = getattr(mem, "peak_memory_in_bytes", 0) or 0
    if chip.platform == "tpu" and peak >= mem.argument_size_in_bytes:
        # libtpu's temp_size_in_bytes is more than its buffer assignment allocates (Meditron on
        # v5p-16: 32.0 GiB vs a 20.7 GiB temp block); its own HBM check agrees with the peak
        # (docs/SCALE.md), so the peak is the bytes the step needs
        total = peak
    return total, peak


def partner_micro_batches(cfg) -> int | None:
    """The second micro-batch count a pipelined ``plan --compile`` compiles beside the run's M:
    M / 2 while that keeps M ≥ S (Meditron's M = 4·S → 2·S), else 2·M; None when the batch
    does not split into it."""
    M, S = cfg.train.grad_accum, cfg.mesh.stage
    other = M // 2 if M % 2 == 0 and M // 2 >= S else 2 * M
    return other if cfg.train.batch_size % other == 0 else None


def _pipeline_rows(cfg, model_cfg, mesh, chip, kind: str, n: int, first: dict) -> list[dict]:
    """The pipelined step's FLOPs and memory at the run's M and at :func:`partner_micro_batches`.

    ``cost_analysis`` counts every loop body once. The pipelined step nests the layer scan of a
    stage (``L / (R·S)`` layers) in the scan over ``R·M + S − 1`` iterations, and the embedding,
    head, loss and optimizer sit outside both, so no one factor scales the count. The two
    compiles separate the parts: a micro-batch holds ``B / M`` rows, so the loop body (one
    layer on one micro-batch, with its share of the iteration's buffer traffic) scales with
    ``1 / M`` while the part outside sees the whole batch at either M. With counts ``c`` at M
    and ``c'`` at M', body ``b = (c − c') / (1 − M / M')`` and outside ``o = c − b``; the step
    runs ``o + (R·M + S − 1) · L / (R·S) · b`` (and at M', ``b · M / M'`` per body), plus the
    loss's other head chunks (:func:`loss_loop_flops`): the head runs once on all M
    micro-batches outside the pipeline (``Decoder._pipelined``), its chunk loop counted once."""
    import dataclasses as dc

    from medjax.models.pipeline import bubble_fraction, iterations
    S, R, M = cfg.mesh.stage, cfg.train.pipeline_repeats, cfg.train.grad_accum
    per = model_cfg.num_layers // (R * S)
    rows = [dict(micro_batches=M, counted=first["counted_flops"],
                 total=first["total"] - first["host_process"], seconds=first["compile_seconds"])]
    other = partner_micro_batches(cfg)
    if other is not None:
        cfg2 = dc.replace(cfg, train=dc.replace(cfg.train, grad_accum=other))
        compiled, _, seconds = _compile_step(cfg2, mesh, model_cfg, chip, kind, n)
        rows.append(dict(micro_batches=other, counted=float(_cost(compiled).get("flops", 0.0)),
                         total=_compiled_total(compiled.memory_analysis(), chip)[0],
                         seconds=seconds))
        c, c2 = rows[0]["counted"], rows[1]["counted"]
        body = (c - c2) / (1 - M / other)
        outside = c - body
    else:           # one compile: the whole count scaled (an upper bound: outside scaled too)
        body, outside = first["counted_flops"], 0.0
    for row in rows:
        m = row["micro_batches"]
        row.update(bubble=bubble_fraction(S, R, m), iterations=iterations(S, R, m),
                   body=body * M / m, outside=outside, loss_loop=first["loss_loop_flops"])
        row["flops"] = outside + row["loss_loop"] + row["iterations"] * per * row["body"]
    return rows


def loss_loop_flops(cfg, model_cfg) -> float:
    """The output head's matmul FLOPs per step (all devices) that ``cost_analysis`` misses in the
    loss's chunk loop (``Decoder.token_nll``: a scan over ``ceil(T / loss_chunk)`` chunks, its
    body counted once): ``(chunks - 1) / chunks`` of the head's passes over the padded tokens —
    forward, its recomputation in the backward, the input gradient, the weight gradient when the
    head trains (not with LoRA), and DPO's reference forward."""
    from medjax.models.decoder import loss_chunk
    T, m = cfg.data.seq_len, model_cfg
    chunk = loss_chunk(T, m.vocab_size)
    chunks = -(-T // chunk)
    if chunks == 1:
        return 0.0
    dpo = cfg.train.objective == "dpo"
    rows = cfg.train.batch_size * (2 if dpo else 1)
    passes = 3 + (not cfg.lora.enabled) + (1 if dpo else 0)
    return (chunks - 1) * passes * 2 * rows * chunk * m.hidden_size * m.vocab_size


def _layer_scan_scale(cfg, model_cfg, estimate, flops) -> float:
    """1, or (model FLOPs with all L layers) / (with one) when the layers run under a scan
    whose body ``cost_analysis`` counts once."""
    if not getattr(cfg.model, "scan_layers", False) or model_cfg.num_layers <= 1:
        return 1.0
    one = model_flops(cfg, model_cfg.replace(num_layers=1), estimate.trainable, estimate.total_params)
    return sum(flops.values()) / sum(one.values())


def _kernel_counts(text: str) -> dict:
    return {"mosaic": text.count("tpu_custom_call"), "triton": text.count("__gpu$xla.gpu.triton"),
            "cudnn": len(re.findall(r"__cudnn\$fmha", text))}


def _oom_error(e: Exception, chip: Chip, kind: str, n: int) -> Exception:
    msg = " ".join(str(e).split())
    m = (re.search(r"Used ([0-9.]+[KMGT]?i?B?) of ([0-9.]+[KMGT]?i?B?) hbm", msg)
         or re.search(r"required for HLO temporaries \(([^)]+)\) exceeds available HBM \(([^)]+)\)",
                      msg))
    if m:
        return ConfigError(f"{kind} x{n}: does not fit: needs {m.group(1)} per device, "
                                f"{m.group(2)} HBM available (XLA compile)")
    if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
        return ConfigError(f"{kind} x{n}: does not fit ({chip.hbm_bytes / GiB:.1f} GiB per "
                                f"device): {msg[:300]}")
    return e


# ----------------------------------------------------------------------------- report
def format_report(cfg, r: dict) -> str:
    chip, est = r["chip"], r["estimate"]
    planned_temp = est.grads + est.activations + est.temporaries + est.weight_copies
    g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    what = cfg.model.preset or cfg.model.path
    lines = [
        f"medjax.plan --compile: {what} · {r['devices']} × {chip.name} · mesh {cfg.mesh.preset} "
        f"[{' '.join(f'{a}={v}' for a, v in est.axis_sizes.items())}] · compiled in "
        f"{r['compile_seconds']:.0f} s",
        f"  kernels in the compiled step: {r['kernels']['mosaic']} Mosaic, "
        f"{r['kernels']['triton']} Triton, {r['kernels']['cudnn']} cuDNN attention calls",
        "  per device (GiB)        compiled   planner",
        f"  arguments              {g(r['argument'])}   {g(r['sharded_arguments'])} (by shardings, "
        f"unpadded)",
        f"  outputs                {g(r['output'])}",
        f"  aliased (donated)      {g(r['alias'])}",
        f"  temporaries            {g(r['temp'])}   {g(planned_temp)} (grads + activations + "
        f"temporaries + weight copies)",
    ]
    if r.get("peak") and r["total"] == r["peak"]:
        lines.append(f"  peak (libtpu)          {g(r['peak'])}   (= arguments + "
                     f"{(r['peak'] - r['argument']) / GiB:.2f}: the total; temporaries above "
                     f"overstate it, docs/SCALE.md)")
    if r.get("host_process"):
        lines.append(f"  host process           {g(r['host_process'])}   (Python + JAX runtime + "
                     f"compiler: this process's peak RSS; no weights)")
    lines += [
        f"  total                  {g(r['total'])}   {g(est.total)}",
        f"  {'host RAM' if chip.platform == 'cpu' else 'HBM':23s}{g(chip.hbm_bytes)}   -> "
        f"{r['total'] / chip.hbm_bytes:.0%} used",
    ]
    matmul, attn = r["model_matmul_flops"], r["model_attention_flops"]
    if r.get("pipeline_rows"):
        lines += _pipeline_lines(cfg, r, matmul + attn)
    elif r["compiled_flops"] is not None:
        model = matmul + attn
        scan = (f" x layer scan {r['layer_scan_scale']:.2f} (model FLOPs all layers / one; Mosaic "
                "kernels inside the scan uncounted)" if r.get("layer_scan_scale", 1.0) != 1.0 else "")
        loss = (f" + the loss's other head chunks {r['loss_loop_flops'] / r['grad_accum']:.3e}"
                if r.get("loss_loop_flops") else "")
        lines.append(f"  FLOPs per step per device: compiled {r['compiled_flops']:.3e} ((loop body"
                     f"{loss}) x grad_accum {r['grad_accum']}{scan}; Pallas kernels by their cost "
                     "estimates) vs "
                     f"model {model:.3e} (matmuls {matmul:.3e} + attention {attn:.3e}) -> "
                     f"{r['compiled_flops'] / max(model, 1):.2f}x")
    else:
        lines.append(f"  FLOPs per step per device: model {matmul + attn:.3e} (matmuls {matmul:.3e}"
                     f", attention {attn:.3e}); this compiler reports no cost analysis")
    lines.append(f"  bytes per device: argument={r['argument']} output={r['output']} "
                 f"alias={r['alias']} temp={r['temp']} peak={r.get('peak', 0)} total={r['total']} "
                 f"sharded_arguments={r['sharded_arguments']} "
                 f"planner_params={int(est.params)} planner_grads={int(est.grads)} "
                 f"planner_optimizer={int(est.optimizer)} planner_total={int(est.total)}")
    if r["optimal_seconds"]:
        lines.append(f"  est. step time >= {r['optimal_seconds']:.3g} s (lower bound: compiler's "
                     f"optimal_seconds x grad_accum)")
    if r["roofline_seconds"] is not None:
        lines.append(f"  est. step time >= {r['roofline_seconds']:.3g} s (lower bound: roofline, "
                     f"FLOPs / {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16 peak)")
    return "\n".join(lines)


def _pipeline_lines(cfg, r: dict, model: float) -> list[str]:
    """The pipelined step at each compiled M: bubble, compiled total, FLOPs against the model's."""
    from medjax.models.pipeline import bubble_fraction
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    S, R = cfg.mesh.stage, cfg.train.pipeline_repeats
    per = r["estimate"].pipeline["layers_per_stage"] // R if r["estimate"].pipeline else "?"
    rows = r["pipeline_rows"]
    lines = [f"  pipeline S={S} R={R}: bubble (S-1)/(R*M+S-1) = "
             + ", ".join(f"{bubble_fraction(S, R, m):.1%} at M={m} ({m // S}*S)" for m in (2 * S, 4 * S)),
             f"  FLOPs per step per device (model {model:.3e}; cost_analysis counts each loop body "
             f"once: outside + iterations x {per} layers x layer body"
             + (f", the two parts from the compiles at M={rows[0]['micro_batches']} and "
                f"M={rows[1]['micro_batches']})" if len(rows) > 1 else
                ": one compile, the outside scaled too, an UPPER bound)")]
    for row in rows:
        m = row["micro_batches"]
        lines.append(
            f"    M={m:<3d} bubble {row['bubble']:.1%}: compiled {row['flops']:.4e} = "
            f"{row['outside']:.4e} + "
            + (f"{row['loss_loop']:.4e} (the loss's other head chunks) + " if row["loss_loop"] else "")
            + f"{row['iterations']} x {per} x {row['body']:.4e} -> "
            f"{row['flops'] / max(model, 1):.2f}x model (bubble factor "
            f"{row['iterations'] / (R * m):.3f}); total {g(row['total'])} GiB per device; "
            f"counted {row['counted']:.4e}; compiled in {row['seconds']:.0f} s")
    return lines


def run(cfg, kind: str, count: int, device_memory: float | None = None, *, model_cfg,
        estimate_fn) -> int:
    """The ``--compile`` branch of ``python -m medjax.plan`` (which parses ``--device`` and passes
    ``model_cfg`` / ``estimate_fn``, see :func:`compile_plan`): prints the report; a compiled step
    that does not fit is then a ConfigError (``error:`` line, exit 2)."""
    r = compile_plan(cfg, kind, count, device_memory, model_cfg=model_cfg, estimate_fn=estimate_fn)
    print(format_report(cfg, r), flush=True)
    if r["total"] > r["chip"].hbm_bytes:
        raise ConfigError(f"{kind} x{r['devices']}: does not fit: needs {r['total']:,} bytes "
                          f"({r['total'] / GiB:.2f} GiB) per device, {r['chip'].hbm_bytes:,} bytes "
                          f"({r['chip'].hbm_bytes / GiB:.2f} GiB) available (compiled)")
    return 0
