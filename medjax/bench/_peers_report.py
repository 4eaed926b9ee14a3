"""``bench peers``' arithmetic and table: per-side runs → rows, the loss-agreement check, the ratios.

Pure Python (no jax): the tests drive it with made-up runs. A *run* is what one side's process
printed (``first_step_s``, ``step_s``, ``loss``, ``peak_rss_mib``; TPU: ``peak_bytes``,
``compiled_flops``, ``model_flops``, ``optimal_seconds``) or ``{"error": "..."}``.

Ratios are always medjax / peer, whatever the unit: above 1 medjax is faster for tokens/s, and
slower or bigger for seconds, bytes and FLOPs (the ``better`` column says which side wins).
"""
from __future__ import annotations

import statistics

LOSS_TOLERANCE = 1e-4          # fp32 first-step loss: |peer - medjax| at most this

# (key, label, unit, higher is better)
CPU_METRICS = [("tokens_per_s", "tokens/s (median of runs)", "tok/s", True),
               ("tokens_per_s_min", "tokens/s (min of runs)", "tok/s", True),
               ("first_step_s", "first step: compile + run (median)", "s", False),
               ("second_step_s", "second step (median; a recompile shows here)", "s", False),
               ("peak_rss_gib", "peak RSS (max of runs)", "GiB", False)]
TPU_METRICS = [("peak_gib", "peak memory per chip", "GiB", False),
               ("flops_ratio", "compiled FLOPs / model FLOPs", "", False),
               ("optimal_seconds", "libtpu optimal_seconds", "s", False),
               # layers unrolled: a Mosaic kernel declaring no cost counts 0 FLOPs and 0 s in
               # libtpu's figures; here each such attention kernel counts medjax's declared cost
               # for its kind (fwd, dq, dkv), so that both sides' attention is costed alike
               ("flops_ratio_imputed", "compiled FLOPs / model FLOPs, every attention kernel costed", "", False),
               ("optimal_seconds_imputed", "libtpu optimal_seconds, every attention kernel costed", "s", False)]


def summarize_cpu(runs: list[dict], tokens: int) -> dict:
    """One side's CPU runs → ``{tokens_per_s, tokens_per_s_min, first_step_s, peak_rss_gib, loss}``
    over the runs that finished (``failed_runs``: how many did not, ``error``: the first one's
    error), or ``{"error"}`` if none did."""
    done = [r for r in runs if "error" not in r]
    failed = [r for r in runs if "error" in r]
    if not done:
        return {"error": failed[0]["error"] if failed else "no runs"}
    rates = [tokens / r["step_s"] for r in done]
    out = {"tokens_per_s": round(statistics.median(rates), 1),
           "tokens_per_s_min": round(min(rates), 1),
           "first_step_s": round(statistics.median(r["first_step_s"] for r in done), 1),
           "second_step_s": round(statistics.median(r["second_step_s"] for r in done), 2),
           "peak_rss_gib": round(max(r["peak_rss_mib"] for r in done) / 1024, 2),
           "loss": done[0]["loss"], "losses": [r["loss"] for r in done], "runs": len(done)}
    if failed:
        out.update(failed_runs=len(failed), run_error=failed[0]["error"])
    return out


def summarize_tpu(run: dict) -> dict:
    """One side's compile report → the TPU metrics (peak GiB per chip, FLOPs ratio, optimal s)."""
    if "error" in run:
        return {"error": run["error"]}
    out = {"peak_gib": round(run["peak_bytes"] / 2**30, 2),
           "optimal_seconds": run.get("optimal_seconds") and round(run["optimal_seconds"], 3),
           "scanned_layers": bool(run.get("scanned_layers")),
           "flops_ratio": None, "compile_s": round(run.get("compile_s", 0.0), 1)}
    if run.get("compiled_flops") and run.get("model_flops"):
        out["flops_ratio"] = round(run["compiled_flops"] / run["model_flops"], 3)
    if run.get("compiled_flops_imputed") and run.get("model_flops"):
        out["flops_ratio_imputed"] = round(run["compiled_flops_imputed"] / run["model_flops"], 3)
    if run.get("optimal_seconds_imputed"):
        out["optimal_seconds_imputed"] = round(run["optimal_seconds_imputed"], 3)
    return out


def per_op_section(per_op: dict, n: int) -> str:
    """``bench peers --tpu``'s per-op table (``peers.per_op``'s result) and what it covers."""
    from medjax.bench import _hlo_ops as hlo_ops
    lines = [f"\nper op (each side's {n} costliest op groups of its compiled step, per chip; ms: libtpu's "
             f"estimated_cycles at the clock, else its rates for the FLOPs/bytes; GB gathered: what "
             f"the collectives in the op deliver):", hlo_ops.top_table(per_op, n)]
    for side, v in per_op.items():
        t, line = v["totals"], f"{side}: per-op sums {v['totals']['flops']:.4g} FLOPs"
        if v.get("compiler_flops"):
            line += f" (cost_analysis {v['compiler_flops']:.4g})"
        line += f", {t['seconds']:.4g} s"
        if v.get("compiler_optimal_seconds"):
            line += f" (optimal_seconds {v['compiler_optimal_seconds']:.4g})"
        line += f"; {t['kernels']} Mosaic kernels, {t['undeclared_kernels']} declaring no cost"
        imp = v.get("imputed")
        if imp and imp["kernels"]:
            line += (f"; costed at medjax's declared cost: +{imp['flops']:.4g} FLOPs, "
                     f"+{imp['seconds']:.4g} s ({imp['kernels']} kernels"
                     + (f", {imp['missing']} of no known kind left at 0" if imp["missing"] else "") + ")")
        lines.append(line)
    return "\n".join(lines)


def loss_agreement(medjax: dict, peer: dict, tol: float = LOSS_TOLERANCE) -> str | None:
    """None if the peer's first-step loss equals medjax's within ``tol``, else why not (one line).
    A side that failed has nothing to compare: its error is reported elsewhere, so None."""
    if "loss" not in medjax or "loss" not in peer:
        return None
    diff = abs(peer["loss"] - medjax["loss"])
    if not diff <= tol:            # NaN fails too
        return (f"first-step loss {peer['loss']:.6f} vs medjax {medjax['loss']:.6f}: "
                f"|diff| {diff:.2e} > {tol:.0e}: the sides do not compute the same step")
    return None


def ratio(medjax_value, peer_value) -> float | None:
    if medjax_value is None or peer_value in (None, 0):
        return None
    return round(medjax_value / peer_value, 2)


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.1f}" if isinstance(value, float) and abs(value) >= 100 else f"{value:g}"


def _better(m, p, higher_is_better: bool, name: str) -> str:
    if m is None or p is None or m == p:
        return ""
    return "medjax" if (m > p) == higher_is_better else name


def table(rows: dict, peers: list[str]) -> str:
    """Markdown: one line per (section, metric); per peer its value, medjax / peer, and who wins.
    ``rows`` = ``{section: {"medjax": summary, peer: summary, ...}}``; a section's metrics
    are the CPU or TPU ones by its name (``cpu full``, ``cpu lora``, ``tpu full``)."""
    head = "| row | medjax | " + " | ".join(f"{p} | medjax/{p} | better" for p in peers) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(peers))]
    for section, sides in rows.items():
        metrics = TPU_METRICS if section.startswith("tpu") else CPU_METRICS
        for key, label, unit, higher in metrics:
            mj = sides.get("medjax", {})
            cells = [f"{section}: {label}" + (f" ({unit})" if unit else ""),
                     "error" if "error" in mj else _cell(mj.get(key))]
            for p in peers:
                s = sides.get(p, {"error": "not run"})
                if "error" in s:
                    cells += ["error", "", ""]
                    continue
                cells += [_cell(s.get(key)), _cell(ratio(mj.get(key), s.get(key))),
                          _better(mj.get(key), s.get(key), higher, p)]
            lines.append("| " + " | ".join(cells) + " |")
        if not section.startswith("tpu"):
            cells = [f"{section}: first-step loss", _cell(sides.get("medjax", {}).get("loss"))]
            for p in peers:
                s = sides.get(p, {})
                bad = loss_agreement(sides.get("medjax", {}), s) if s else None
                cells += [_cell(s.get("loss")), "", "MISMATCH" if bad else ("agrees" if "loss" in s else "")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def errors(rows: dict) -> list[str]:
    """Every side's error and every loss disagreement, one line each."""
    out = []
    for section, sides in rows.items():
        for name, s in sides.items():
            if "error" in s:
                out.append(f"{section} {name}: {s['error']}")
            elif s.get("failed_runs"):
                out.append(f"{section} {name}: {s['failed_runs']} of {s['runs'] + s['failed_runs']} runs "
                           f"failed ({s['run_error']}); the row is over the others")
        if not section.startswith("tpu"):
            for name, s in sides.items():
                bad = name != "medjax" and loss_agreement(sides.get("medjax", {}), s)
                if bad:
                    out.append(f"{section} {name}: {bad}")
    return out
