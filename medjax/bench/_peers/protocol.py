"""What every side of ``bench peers`` does the same way: the step's settings, the batch file, the
timing loop and the one JSON line a side prints. Standard library + numpy only: the peer venvs
run it as a plain module beside their script, medjax imports it as ``medjax.bench._peers.protocol``.

The step: one optimizer step (forward, backward, update) on the batch in ``batch.npz``
(``input_ids [B, T]``; the loss is the mean next-token cross-entropy over positions 0..T-2, the
last position has no target), fp32 on CPU, AdamW(lr 1e-4, b1 0.9, b2 0.999, eps 1e-8, weight
decay 0) after global-norm clipping at 1.0; LoRA: rank 8, alpha 16, no dropout, on the seven
projections, base frozen.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

LR, B1, B2, EPS, WEIGHT_DECAY, CLIP_NORM = 1e-4, 0.9, 0.999, 1e-8, 0.0, 1.0
LORA_RANK, LORA_ALPHA = 8, 16.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RESULT_PREFIX = "PEER-RESULT "       # the line the orchestrator reads among the stack's logs

# TPU compile rows: Llama-2-7B shape (hidden 4096, ffn 11008, 32 layers, 32 heads, vocab 32000),
# params fp32, compute bf16, every layer rematerialised, fully sharded (FSDP) over the slice.
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                 num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0)


def peak_rss_mib() -> float:
    """This process's peak resident set (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_batch(path):
    """``input_ids [B, T] int32`` of the shared batch file."""
    import numpy as np
    with np.load(path) as f:
        return f["input_ids"]


def time_steps(step, steps: int) -> dict:
    """Call ``step() -> loss (float, synchronised)`` once (compile + run), once more untimed (a
    stack may compile again when its state changes type after the first step: EasyDeL does), and
    ``steps`` more times. Returns the first step's loss and seconds, and the median of the last."""
    t = time.perf_counter()
    loss = float(step())
    first = time.perf_counter() - t
    t = time.perf_counter()
    step()
    second = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"loss": loss, "first_step_s": first, "second_step_s": second,
            "step_s": statistics.median(times),
            "peak_rss_mib": peak_rss_mib()}


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict | None:
    """The last result line a side printed, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def side_parser(prog: str) -> argparse.ArgumentParser:
    """The command line every peer script takes."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("what", choices=["cpu", "tpu"])
    p.add_argument("--mode", choices=["full", "lora"], default="full")
    p.add_argument("--weights", help="cpu: HF directory (config.json + safetensors)")
    p.add_argument("--batch", help="cpu: batch.npz")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--topology", default="v5p:2x2x1", help="tpu: compile-only topology")
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--unroll", action="store_true",
                   help="tpu: layers unrolled, not scanned, so cost_analysis counts every layer")
    p.add_argument("--layers", type=int, default=LLAMA2_7B["num_layers"],
                   help="tpu: depth (fewer for a quick check of the side itself)")
    p.add_argument("--hlo", help="tpu: also write the compiled step's HLO text here (per-op costs)")
    return p


def run_side(main) -> None:
    """Run ``main()``; an exception becomes the result ``{"error": one line}`` (exit 1)."""
    try:
        emit(main())
    except Exception as e:  # noqa: BLE001 — the stack's failure is the result to report
        text = " ".join(str(e).split())[:400]
        emit({"error": f"{type(e).__name__}: {text}"})
        import traceback
        traceback.print_exc()
        sys.exit(1)


# ----------------------------------------------------------------------------- TPU compile rows
def tpu_devices(topology: str):
    """Compile-only TPU devices (libtpu) of ``topology``, refusing to start without the
    environment that keeps libtpu off any metadata server."""
    import os
    if os.environ.get("TPU_SKIP_MDS_QUERY") != "1" or os.environ.get("JAX_PLATFORMS") != "cpu":
        raise RuntimeError("compile-only TPU needs TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu")
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


class target_v5p:
    """While active, Pallas/Mosaic lowering targets a TPU v5p instead of asking the (CPU) default
    device which chip it is (as medjax's ``ops/pallas/tpu_compile.target_chip`` does)."""

    def __enter__(self):
        import importlib
        self.modules = [importlib.import_module("jax._src.pallas.mosaic.tpu_info")]
        try:
            self.modules.append(importlib.import_module("jax._src.tpu_info"))
        except ImportError:
            pass
        info = self.modules[0].get_tpu_info_for_chip(self.modules[0].ChipVersion.TPU_V5P, 1)
        self.saved = [m.get_tpu_info for m in self.modules]
        for m in self.modules:
            m.get_tpu_info = lambda *a, **k: info
        return info

    def __exit__(self, *exc):
        for m, original in zip(self.modules, self.saved):
            m.get_tpu_info = original
        return False


def compile_report(compiled, seconds: float, scanned_layers: bool, hlo_path=None) -> dict:
    """What the compiler says about one compiled step, per chip: peak bytes (libtpu's
    ``peak_memory_in_bytes``, else argument + output - alias + temp), raw cost-analysis FLOPs and
    ``optimal_seconds`` (a scan's body counted once: ``scanned_layers`` tells the caller to scale).
    ``hlo_path``: the optimized HLO text is written there too (``medjax/bench/_hlo_ops.py`` reads it)."""
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    peak = getattr(mem, "peak_memory_in_bytes", 0) or 0
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    return {"peak_bytes": peak if peak >= mem.argument_size_in_bytes else total,
            "compiled_flops": float(cost.get("flops", 0.0)),
            "optimal_seconds": float(cost.get("optimal_seconds", 0.0)) or None,
            "compile_s": seconds, "scanned_layers": scanned_layers,
            "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "alias_bytes": mem.alias_size_in_bytes,
            "kernels": custom_calls(text)}


def custom_calls(hlo_text: str) -> dict:
    """``{custom call target: count}`` in compiled HLO text (Mosaic kernels: ``tpu_custom_call``,
    named by their ``kernel_name``)."""
    import collections
    import re
    found = collections.Counter()
    for line in hlo_text.splitlines():
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target:
            name = re.search(r'"kernel_name":"?([\w.-]+)', line) or re.search(r'name = "([\w.-]+)"', line)
            found[target.group(1) + (f":{name.group(1)}" if name and target.group(1) == "tpu_custom_call" else "")] += 1
    return dict(found)
