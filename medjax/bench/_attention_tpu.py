"""``python -m medjax.bench attention --compile-only tpu``: compile the Pallas kernels for TPUs.

Runs the real XLA:TPU + Mosaic compiler on compile-only devices (``ops/pallas/tpu_compile.py``)
for each chip and case: forward + backward (one ``jax.vjp``: forward, dQ and dK/dV kernels) of
``attention(..., implementation="pallas")`` with ``backend="mosaic_tpu"``, and the decode kernel
against a long cache. Per case it prints the compile time, the Mosaic kernels found in the
compiled HLO (``tpu_custom_call``), each kernel's scoped VMEM as the compiler allotted it
(``used_scoped_memory_configs`` in the compiled HLO), the chip's default scoped-VMEM limit,
XLA's HBM temporaries and the cost-analysis FLOPs. A case the compiler rejects prints its one-line error.

The main venv has no libtpu: run from it, the command re-runs itself with ``.venv-tpu``'s Python
and ``TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu`` (``make tpu-venv`` creates that venv).
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np

# (B, T, Hq, Hkv) x mask name; D = 128, bf16 throughout.
MATRIX = [(b, t, hq, 8, "causal") for t in (2048, 8192, 32768) for b in (1, 4)
          for hq in (32, 64)] + [(b, 32768, hq, 8, "decode") for b in (1, 4) for hq in (32, 64)]
CI = [(1, 4096, 32, 8, "causal"), (1, 32768, 32, 8, "causal"), (1, 4096, 32, 8, "packed"),
      (1, 32768, 32, 8, "window"), (1, 32768, 32, 8, "decode")]
CASES = {"matrix": MATRIX, "ci": CI}
SCOPED_VMEM_MIB = {"v5e": 16, "v5p": 16, "v6e": 32}   # Mosaic's default per-kernel limit
WINDOW = 4096


def packed_segments(T):
    """Segment ids ``[T]`` (int32) of three documents of uneven length packed into one row."""
    return (np.searchsorted([0.45 * T, 0.8 * T], np.arange(T), side="right") + 1).astype(np.int32)


def _case_fn(B, T, Hq, Hkv, mask):
    """(function, argument ShapeDtypeStructs) of one case."""
    import jax
    import jax.numpy as jnp
    from medjax.ops.pallas import decode_attention, flash_attention
    D, dtype = 128, jnp.bfloat16
    kv = jax.ShapeDtypeStruct((B, T, Hkv, D), dtype)
    if mask == "decode":   # one new token per sequence against a T-token cache, ragged lengths
        lengths = np.linspace(T // 2, T, B).astype(np.int32)
        q = jax.ShapeDtypeStruct((B, 1, Hq, D), dtype)
        fn = lambda q, k, v: decode_attention(
            q, k, v, q_positions=jnp.asarray(lengths - 1)[:, None],
            kv_lengths=jnp.asarray(lengths), backend="mosaic_tpu")
        return fn, [q, kv, kv]
    kwargs = dict(causal=True)
    if mask == "window":
        kwargs["sliding_window"] = WINDOW
    if mask == "packed":
        kwargs["segment_ids"] = jnp.asarray(np.broadcast_to(packed_segments(T), (B, T)))
    q = jax.ShapeDtypeStruct((B, T, Hq, D), dtype)

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, backend="mosaic_tpu",
                                                           **kwargs), q, k, v)
        return out, *vjp(out)
    return fwd_bwd, [q, kv, kv]


def compile_case(chip, case) -> dict:
    from medjax.ops.pallas import tpu_compile
    B, T, Hq, Hkv, mask = case
    fn, shapes = _case_fn(B, T, Hq, Hkv, mask)
    row = tpu_compile.compile_for_tpu(fn, shapes, chip)
    row.update(chip=chip, B=B, T=T, Hq=Hq, Hkv=Hkv, mask=mask,
               scoped_vmem_mib=SCOPED_VMEM_MIB.get(chip))
    return row


def _vmem_cell(vmem_mib: dict) -> str:
    short = lambda name: name.replace("medjax_flash_", "").replace("bwd_", "")
    return ", ".join(f"{short(k)} {v:.2f}" for k, v in sorted(vmem_mib.items()))


def format_table(rows) -> str:
    lines = ["| chip | B | T | Hq/Hkv | case | compile s | Mosaic calls | VMEM MiB per kernel "
             "| scoped limit MiB | HBM temp MiB | GFLOP (cost analysis) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['chip']} | {r['B']} | {r['T']} | {r['Hq']}/{r['Hkv']} | {r['mask']} | "
        if "error" in r:
            lines.append(head + f"{r['compile_s']:.1f} | {r['error']} | | | | |")
            continue
        lines.append(head + f"{r['compile_s']:.1f} | {r['tpu_custom_calls']} | "
                     f"{_vmem_cell(r['vmem_mib'])} | {r['scoped_vmem_mib']} | {r['hbm_temp_mib']:.0f} | "
                     f"{r['flops'] / 1e9:.0f} |")
    return "\n".join(lines)


def _reexec(argv) -> int:
    """Run this command again in a Python that has libtpu, with the compile-only environment."""
    from medjax.ops.pallas import tpu_compile
    python = tpu_compile.libtpu_python()
    if python is None:
        from medjax.errors import ConfigError
        raise ConfigError("libtpu is not installed: run `make tpu-venv` (creates .venv-tpu)")
    cmd = [str(python), "-m", "medjax.bench", "attention", *argv]
    return subprocess.run(cmd, env=tpu_compile.compile_only_env()).returncode


def main(args, argv) -> int:
    from medjax.ops.pallas import tpu_compile
    import importlib.util
    chips = [c.strip() for c in args.chips.split(",") if c.strip()]
    unknown = sorted(set(chips) - set(tpu_compile.CHIPS))
    if unknown:
        from medjax.errors import ConfigError
        raise ConfigError(f"--chips: unknown chip(s) {unknown}; choose from {sorted(tpu_compile.CHIPS)}")
    if (importlib.util.find_spec("libtpu") is None or os.environ.get("TPU_SKIP_MDS_QUERY") != "1"
            or os.environ.get("JAX_PLATFORMS") != "cpu"):
        return _reexec(argv)
    import jax
    print(f"# Pallas attention compiled for TPU on {os.uname().machine} CPU (compile-only), "
          f"jax {jax.__version__}, bf16, D=128, fwd+bwd (decode: forward)", flush=True)
    rows = []
    for chip in chips:
        for case in CASES[args.cases]:
            rows.append(compile_case(chip, case))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + format_table(rows))
    if args.json:
        from medjax.outputs import write_file
        write_file(args.json, json.dumps(dict(jax=jax.__version__, rows=rows), indent=1))
    return 1 if any("error" in r for r in rows) else 0
