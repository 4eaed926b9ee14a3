"""``python -m medjax.bench fullsize``: a full-width random checkpoint through the product path
(load → train → export → transformers / peft / GGUF), each phase in a process of its own.

    python -m medjax.bench fullsize --preset llama2-7b [--layers N] [--steps 2] [--work DIR]
    python -m medjax.bench fullsize --preset mixtral-8x7b-2l

Phases: ``fixture`` (``_fullsize_fixture``: written once, then reused from the cache),
``train`` (``python -m medjax.train`` with the recipe's config: MELT-Llama-2 LoRA r64 α16 on every
projection, or BiMediX nf4 QLoRA with adapters on experts and router; remat full, scanned
layers, bf16; it loads, compiles and runs the steps), ``export-hf`` / ``export-peft`` /
``export-gguf`` (``python -m medjax.export``; the GGUF for Llama only), ``logits-medjax`` (the
trained model restored from its checkpoint, merged, on a fixed 16-token prompt;
``logits-adapters``: the same with the adapters applied unmerged, peft's reference),
``compare-hf`` (transformers loads the merged export; relative error of its logits),
``peft`` (transformers + peft load the adapter onto the fixture) and ``gguf`` (medjax reads the
GGUF back). Each row gives wall time and the peak RSS of that process (``wait4``'s rusage; Linux
counts it from the fork, so no row reads below this launcher's own ~0.2 GiB);
the train row also gives ``python -m medjax.plan --device cpu``'s prediction for the same config.
A JSON summary is written to ``<work>/fullsize.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from medjax.errors import ConfigError

RECIPES = {"llama2-7b": "configs/melt_llama2_lora.yaml",
           "mixtral-8x7b-2l": "configs/bimedix_mixtral_qlora.yaml"}
PROMPT = "A 45-year-old man presents with crushing chest pain radiating to the left arm, sweating and nausea."
PROMPT_TOKENS = 16
MAX_REL_ERR = 2e-2          # fp32 compute over the same bf16 weights (the bf16 bound)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def run_phase(name: str, argv: list[str], log: Path) -> dict:
    """Run ``argv`` as a child process; its wall time and peak RSS (``wait4``) as a row."""
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"\n=== {name}: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=repo_root())
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"phase": name, "wall_s": round(time.perf_counter() - start, 1),
           "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2), "rc": proc.returncode}
    print(f"  {name:14s} {row['wall_s']:8.1f} s  {row['peak_rss_gib']:7.2f} GiB"
          + ("" if row["rc"] == 0 else f"  FAILED (exit {row['rc']}, see {log})"), flush=True)
    return row


def train_breakdown(run: Path) -> dict:
    """The train process's own split of its wall time: load + setup (everything before the first
    step), the first step (which includes compiling it) and the later steps (their mean)."""
    summary = json.loads((run / "summary.json").read_text())
    steps = [json.loads(line)["step_time_s"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"kind": "train"' in line]
    out = {"load_setup_s": round(summary["total_seconds"] - summary["train_seconds"], 1),
           "first_step_s": round(steps[0], 1), "load_peak_rss_gib": summary.get("load_peak_rss_gib"),
           "setup_peak_rss_gib": summary.get("setup_peak_rss_gib")}
    if len(steps) > 1:
        out["step_s"] = round(sum(steps[1:]) / len(steps[1:]), 1)
    return out


def planned_peak_gib(config: str, overrides: list[str], *, compile: bool = False) -> float | None:
    """``python -m medjax.plan --device cpu``'s max(total, load/init peak) for the run, in GiB;
    with ``compile``, ``--compile``'s total (the step compiled for this CPU + the runtime)."""
    out = subprocess.run([sys.executable, "-m", "medjax.plan", "--config", config, *overrides,
                          "--device", "cpu", *(["--compile"] if compile else [])],
                         capture_output=True, text=True, cwd=repo_root())
    values = {k: float(v) for k, v in re.findall(r"^\s*(total|load/init peak)\s+([0-9.]+)", out.stdout, re.M)}
    return max(values.values()) if values else None


def _prompt_ids(directory) -> list[int]:
    from medjax.tokenizer import load_tokenizer
    ids = load_tokenizer(directory).encode(PROMPT, add_special_tokens=True)[:PROMPT_TOKENS]
    if len(ids) != PROMPT_TOKENS:
        raise RuntimeError(f"the prompt gives {len(ids)} tokens, need {PROMPT_TOKENS}")
    return ids


def rel_err(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _medjax_logits(model, ids, *, fp32: bool = True):
    """One jitted forward, compiled with medjax's options for the platform (on CPU: one layer of
    a scanned bf16 stack converted to f32 at a time, not the whole stack). ``fp32``: every
    module computes in float32 over its bf16 weights (the comparisons' reference: bf16 rounding
    of the activations grows with depth, ~sqrt(layers), and is not what they check)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from medjax.ops.target import compiler_options
    if fp32:
        for _, module in nnx.iter_modules(model):
            if getattr(module, "dtype", None) in (jnp.bfloat16, jnp.float16):
                module.dtype = jnp.float32
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).astype(jnp.float32),
                      compiler_options=compiler_options(state))
    return np.asarray(forward(state, jnp.asarray([ids], jnp.int32)))[0]


def _phase_logits_medjax(a) -> None:
    """The trained model (restored from its checkpoint, adapters merged in bf16 as the export
    writes them; ``--adapters``: applied unmerged, as peft does) on the prompt."""
    import numpy as np
    from medjax.loading import load
    model, _ = load(a.run, merge_adapters=not a.adapters)     # a run: rebuilt as it trained
    ids = _prompt_ids(a.fixture)
    if not a.adapters:
        np.save(_bf16_reference(a.out), _medjax_logits(model, ids, fp32=False))   # as trained
    np.save(a.out, _medjax_logits(model, ids))


def _bf16_reference(path) -> Path:
    return Path(path).with_suffix(".bf16.npy")


def _torch_logits(model, ids, *, fp32: bool = True):
    """The logits of a bf16 transformers model; ``fp32``: computed in float32 over its bf16
    weights, each decoder layer upcast just before it runs and cast back after (exact: bf16 ->
    fp32 -> bf16), so the host holds one fp32 layer (a 7B model in fp32 is 25 GiB)."""
    import torch
    def upcast(layer, args):
        layer.float()                   # a hook that returns None keeps the layer's inputs

    def downcast(layer, args, out):
        layer.to(torch.bfloat16)        # ... and its outputs

    hooks = []
    if fp32:
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        for module in (core.model.embed_tokens, core.model.norm, core.lm_head):
            module.float()
        for layer in core.model.layers:
            hooks += [layer.register_forward_pre_hook(upcast), layer.register_forward_hook(downcast)]
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()
    finally:
        for hook in hooks:
            hook.remove()


def _check(what: str, err: float, bound: float) -> None:
    print(f"{what}: relative error {err:.3e} (bound {bound:g})")
    if not err <= bound:
        raise SystemExit(f"{what}: relative error {err:.3e} > {bound:g}")


def _phase_compare_hf(a) -> None:
    import numpy as np
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
    ids = _prompt_ids(a.fixture)
    print(f"transformers(merged export) vs medjax, both computing in bf16: relative error "
          f"{rel_err(_torch_logits(model, ids, fp32=False), np.load(_bf16_reference(a.reference))):.3e}")
    _check("transformers(merged export) vs medjax, fp32 compute over the bf16 weights",
           rel_err(_torch_logits(model, ids), np.load(a.reference)), MAX_REL_ERR)


def _phase_peft(a) -> None:
    import numpy as np
    import torch
    import transformers
    from peft import PeftModel
    base = transformers.AutoModelForCausalLM.from_pretrained(a.fixture, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, a.model).eval()
    _check("peft(fixture + adapter) vs medjax, fp32 compute over the bf16 weights",
           rel_err(_torch_logits(model, _prompt_ids(a.fixture)), np.load(a.reference)), MAX_REL_ERR)


def _q8_0_excess(read_back, exported) -> float:
    """max |read_back - exported| over q8_0's rounding step (its 32-element blocks along a row:
    block max / 127) plus bf16's (2^-7 relative): <= 1 when the GGUF holds the exported weights."""
    import numpy as np
    a = np.asarray(read_back, np.float32).reshape(-1, 32)
    b = np.asarray(exported, np.float32).reshape(-1, 32)
    step = np.abs(b).max(axis=1, keepdims=True) / 127 + np.abs(b) * 2.0 ** -7
    return float((np.abs(a - b) / np.maximum(step, 1e-30)).max())


def _phase_gguf(a) -> None:
    """medjax reads the q8_0 GGUF back: every tensor equals the merged HF export's within q8_0's
    rounding (a layout or permutation bug is O(1) off); the logits' error is printed (q8_0 noise
    grows with depth like bf16's: 3.1e-2 at 2 layers)."""
    import numpy as np
    import jax.numpy as jnp
    from flax import nnx

    from medjax.hf.names import export_tensors
    from medjax.hf.safetensors_io import find_weight_files, index_tensors
    from medjax.loading import load
    from medjax.models.stack import per_layer_flat, read_value
    from medjax.sharding import host_value
    # bf16 weights (f32: 2x RAM), layers scanned as trained: the loop layout's 32 layers give
    # XLA:CPU 32 independent fp32 converts, which it scheduled together (26 GB at 7B)
    model, _ = load(a.model, dtype=jnp.bfloat16, scan_layers=True, progress=False)
    exported = index_tensors(find_weight_files(a.hf))
    flat = per_layer_flat(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    excess, names = 0.0, []
    for name, arr in export_tensors(model.config, lambda p, index=(): host_value(read_value(flat[p], index))):
        excess = max(excess, _q8_0_excess(arr, exported[name].read()))
        names.append(name)
    if sorted(names) != sorted(exported):
        raise SystemExit(f"GGUF read back: tensors {sorted(set(exported) ^ set(names))[:4]} differ")
    print(f"medjax(q8_0 GGUF) vs medjax, fp32 compute: relative error "
          f"{rel_err(_medjax_logits(model, _prompt_ids(a.fixture)), np.load(a.reference)):.3e}")
    _check(f"medjax(q8_0 GGUF) weights vs the merged export, {len(names)} tensors, in q8_0 steps",
           excess, 1.0)


PHASES = {"logits-medjax": _phase_logits_medjax, "compare-hf": _phase_compare_hf,
          "peft": _phase_peft, "gguf": _phase_gguf}


def run_all(preset: str, layers: int | None, steps: int, work: Path, max_shard_bytes: int | None) -> dict:
    """Every phase in order (stopping at the first failure); the summary, also in fullsize.json."""
    from medjax.bench._fullsize_fixture import MAX_SHARD_BYTES, cache_dir, model_config
    py, me = sys.executable, "medjax.bench.fullsize"
    cfg = model_config(preset, layers)
    fixture = cache_dir() / f"{preset}-{cfg.num_layers}l"
    if max_shard_bytes:
        fixture = fixture.with_name(fixture.name + f"-{max_shard_bytes}")
    if work.exists() and any(work.iterdir()) and not (work / "fullsize.log").exists():
        raise ConfigError(f"--work {work} exists and is not a fullsize work directory (no fullsize.log): "
                          f"it is left alone; name another --work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log, run, out = work / "fullsize.log", work / "run", work / "export"
    config = RECIPES[preset]
    overrides = [f"model.path={fixture}", "model.preset=null", "data.seq_len=64", "train.batch_size=1",
                 "train.grad_accum=1", f"train.steps={steps}", "train.epochs=null", "train.export=[]",
                 "optim.warmup_steps=0", "eval.tasks=[]", f"train.out_dir={run}", "checkpoint.every=0"]
    llama = not cfg.is_moe
    phases = [("fixture", [py, "-m", "medjax.bench._fullsize_fixture", "--preset", preset,
                           "--layers", str(cfg.num_layers), "--out", str(fixture),
                           "--max-shard-bytes", str(max_shard_bytes or MAX_SHARD_BYTES)]),
              ("train", [py, "-m", "medjax.train", "--config", config, *overrides]),
              ("export-hf", [py, "-m", "medjax.export", "--checkpoint", str(run), "--out", str(out / "hf"),
                             "--dtype", "bfloat16"])]
    if llama:
        phases += [("export-peft", [py, "-m", "medjax.export", "--checkpoint", str(run), "--peft",
                                    "--out", str(out / "peft")]),
                   ("export-gguf", [py, "-m", "medjax.export", "--checkpoint", str(run), "--gguf", "q8_0",
                                    "--out", str(out / "model.q8_0.gguf")])]
    ref = work / "logits_medjax.npy"
    common = ["--fixture", str(fixture), "--reference", str(ref)]
    phases += [("logits-medjax", [py, "-m", me, "--phase", "logits-medjax", "--run", str(run),
                                  "--out", str(ref), *common]),
               ("compare-hf", [py, "-m", me, "--phase", "compare-hf", "--model", str(out / "hf"), *common])]
    if llama:
        unmerged = work / "logits_medjax_adapters.npy"       # peft's reference: adapters not merged
        phases += [("logits-adapters", [py, "-m", me, "--phase", "logits-medjax", "--run", str(run),
                                        "--adapters", "--out", str(unmerged), *common]),
                   ("peft", [py, "-m", me, "--phase", "peft", "--model", str(out / "peft"),
                             "--fixture", str(fixture), "--reference", str(unmerged)]),
                   ("gguf", [py, "-m", me, "--phase", "gguf", "--model", str(out / "model.q8_0.gguf"),
                             "--hf", str(out / "hf"), *common])]
    print(f"medjax.bench fullsize: {preset}, {cfg.num_layers} layers, {steps} steps; log {log}")
    print(f"  {'phase':14s} {'wall':>10s}  {'peak RSS':>11s}")
    rows, checkpoint = [], None
    for name, argv in phases:
        row = run_phase(name, argv, log)
        if name == "fixture" and row["rc"] == 0:
            checkpoint = sum(f.stat().st_size for f in fixture.glob("*.safetensors")) / 2**30
            row["checkpoint_gib"] = round(checkpoint, 2)
        if name == "train" and row["rc"] == 0:
            row.update(train_breakdown(run))
            print(f"  {'':14s} load+setup {row['load_setup_s']} s, step 1 (with compile) "
                  f"{row['first_step_s']} s, later steps {row.get('step_s', '-')} s each")
            if row.get("load_peak_rss_gib"):
                print(f"  {'':14s} peak RSS through the load {row['load_peak_rss_gib']:.2f} GiB "
                      f"= {row['load_peak_rss_gib'] / checkpoint:.2f}x the checkpoint (runtime included)")
            if row.get("setup_peak_rss_gib"):
                print(f"  {'':14s} peak RSS through load + setup {row['setup_peak_rss_gib']:.2f} GiB "
                      f"= {row['setup_peak_rss_gib'] / checkpoint:.2f}x the {checkpoint:.2f} GiB "
                      f"checkpoint (runtime included)")
            for key, flag in (("plan_gib", False), ("plan_compiled_gib", True)):
                row[key] = planned_peak_gib(config, overrides, compile=flag)
                if row[key]:
                    off = row["peak_rss_gib"] / row[key] - 1
                    print(f"  {'':14s} plan --device cpu{' --compile' if flag else ''}: "
                          f"{row[key]:.2f} GiB (measured {off:+.1%})")
        rows.append(row)
        if row["rc"] != 0:
            break
    summary = {"preset": preset, "layers": cfg.num_layers, "steps": steps, "phases": rows,
               "load_average": os.getloadavg(),
               "ok": len(rows) == len(phases) and all(r["rc"] == 0 for r in rows)}
    (work / "fullsize.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medjax.bench fullsize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(RECIPES), default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None,
                    help="layers (default: 32 for llama2-7b, 2 for mixtral)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work", default="runs/fullsize", help="run, exports, log and JSON go here (replaced)")
    ap.add_argument("--max-shard-bytes", type=int, default=None,
                    help="fixture file size limit (default 10 GB, like Meta's release)")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    for hidden in ("--run", "--out", "--model", "--fixture", "--reference", "--hf"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--adapters", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase:
        PHASES[a.phase](a)
        return 0
    if not Path(a.work).resolve().parent.is_dir():
        raise ConfigError(f"--work {a.work}: its parent directory does not exist")
    summary = run_all(a.preset, a.layers, a.steps, Path(a.work).resolve(), a.max_shard_bytes)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
