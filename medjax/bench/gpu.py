"""The GPU check: ``python -m medjax.bench gpu [--dry-run] [--out DIR] [--parts a,b]``.

One command for a lent H100/H200 (docs/GPU.md), under 8 minutes, writing ``DIR/gpu_check.json``
and ``DIR/gpu_check.md`` (one table). Parts, in order, each in a process of its own with its own
time budget (``_gpu_parts.py``):

* ``smoke``     versions, the device, one tiny LoRA train step; if it fails the check stops;
* ``attention`` bf16 causal fwd+bwd, 32x128 MHA and 32/8 GQA, T = 2k..32k: medjax Pallas
  (Triton), cuDNN through medjax's dispatch, medjax's XLA path; time, TFLOP/s, max error;
* ``train``     Llama-2-7B MELT LoRA step (r64, all projections, remat full, scan, seq 4096,
  batch 1/2/4) vs transformers + PEFT (SDPA, gradient checkpointing): tokens/s, MFU, memory;
* ``mcqa``      256 MedQA-length prompts: medjax's Scorer vs a batched transformers forward;
* ``decode``    512 new tokens at batch 1 and 16: medjax's Generator vs ``transformers.generate``;
* ``moe``       one Mixtral MoE layer, 4096 tokens fwd+bwd: grouped matmul vs the same active
  work as dense matmuls vs transformers' ``MixtralSparseMoeBlock``.

A part that fails or runs out of its budget is recorded with its error; its finished rows stay
and the next part runs. The table is rewritten after every part. ``--dry-run`` runs every part at
tiny shapes on this machine's backend (CPU: interpret-mode Pallas, no cuDNN).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, seconds on the GPU, seconds in a dry run): 480 s in all on the GPU.
PARTS = (("smoke", 45, 120), ("attention", 90, 180), ("train", 190, 240), ("mcqa", 50, 120),
         ("decode", 70, 120), ("moe", 35, 120))


def launch(cmd: list[str], budget: float, rows_file: Path) -> dict:
    """Run one part's command in its own process group for at most ``budget`` seconds.
    ``{"rows": [...], "error": str | None, "seconds": float}``; rows are what it appended to
    ``rows_file`` (kept when it fails or times out)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)
    error = None
    try:
        rc = proc.wait(timeout=budget)
        if rc != 0:
            error = f"exited with status {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)      # the part and the processes it spawned
        proc.wait()
        error = f"timed out after its budget of {budget:.0f} s"
    rows = []
    if rows_file.exists():
        for line in rows_file.read_text().splitlines():
            record = json.loads(line)
            if set(record) == {"error"}:
                error = record["error"]
            else:
                rows.append(record)
    return {"rows": rows, "error": error, "seconds": time.perf_counter() - start}


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def format_table(header: dict, rows: list[dict]) -> str:
    lines = [f"# medjax GPU check: {header['device']}, jax {header['jax']}, {header['date']}"
             + (" (dry run)" if header["dry_run"] else ""), "",
             "| part | case | impl | time ms | rate | TFLOP/s | MFU | peak GiB | max err "
             "| medjax speedup | note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        rate = f"{r['rate']:.4g} {r.get('unit', '')}" if r.get("rate") else ""
        speedup = f"{r['speedup']:.2f}x vs {r['vs']}" if r.get("speedup") else ""
        note = r.get("error") or r.get("note") or ""
        cells = [r.get("part", ""), r.get("case", ""), r.get("impl", ""), _fmt(r.get("ms"), ".4g"),
                 rate, _fmt(r.get("tflops"), ".4g"), _fmt(r.get("mfu"), ".3f"),
                 _fmt(r.get("peak_gib"), ".2f"), _fmt(r.get("max_err"), ".3g"), speedup,
                 note.replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run(parts, *, dry_run: bool, out: Path, launcher=launch) -> dict:
    """Run ``parts`` in order; write the JSON and the table after each; stop after a failed smoke."""
    import jax       # only its version: no backend starts in this process
    header = {"jax": jax.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "device": "unknown", "dry_run": dry_run}
    print(f"# medjax GPU check: jax {header['jax']}, python {header['python']}, {header['date']}"
          + (", dry run" if dry_run else ""), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    result = {"header": header, "parts": {}, "rows": []}
    device_kind = None
    with tempfile.TemporaryDirectory(prefix="medjax_gpu_check_") as work:
        for name, budget, dry_budget in parts:
            budget = dry_budget if dry_run else budget
            rows_file = Path(work) / f"{name}.jsonl"
            cmd = [sys.executable, "-m", "medjax.bench._gpu_parts", name, "--rows",
                   str(rows_file)] + (["--dry-run"] if dry_run else []) + (
                   ["--device-kind", device_kind] if device_kind else [])
            print(f"\n## {name} (budget {budget} s)", flush=True)
            res = launcher(cmd, budget, rows_file)
            result["parts"][name] = {"error": res["error"], "seconds": round(res["seconds"], 1)}
            result["rows"] += res["rows"]
            if res["error"]:
                result["rows"].append({"part": name, "case": "(part)", "error": res["error"]})
            env = next((r for r in res["rows"] if r.get("case") == "environment"), None)
            if env:
                device_kind = env["device"]
                header.update(device=f"{env['device']} ({env['backend']})", versions=env["versions"])
                print(f"# device: {header['device']}, jax {env['versions'].get('jax')}, "
                      f"python {env.get('python')}", flush=True)
            print(f"## {name}: {res['error'] or 'done'} in {res['seconds']:.0f} s", flush=True)
            _write(out / "gpu_check.json", json.dumps(result, indent=1) + "\n")
            _write(out / "gpu_check.md", format_table(header, result["rows"]))
            if name == "smoke" and res["error"]:
                print("the smoke part failed: this image cannot run medjax; stopping", flush=True)
                break
    return result


def has_cuda_jax() -> bool:
    """jax's CUDA plugin is installed (looked up, not imported: no backend starts here)."""
    import importlib.util
    return any(importlib.util.find_spec(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medjax.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on this machine (CPU)")
    p.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json / .md")
    p.add_argument("--parts", default=",".join(name for name, *_ in PARTS),
                   help="comma list, run in the order above (smoke is always first when named)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - {name for name, *_ in PARTS})
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {[name for name, *_ in PARTS]}")
    dry_run = args.dry_run or not has_cuda_jax()
    if dry_run and not args.dry_run:
        print("no CUDA plugin for jax here: running the dry run (tiny shapes)", flush=True)
    result = run([part for part in PARTS if part[0] in names], dry_run=dry_run, out=Path(args.out))
    print("\n" + (Path(args.out) / "gpu_check.md").read_text())
    smoke = result["parts"].get("smoke")
    return 1 if smoke and smoke["error"] else 0
