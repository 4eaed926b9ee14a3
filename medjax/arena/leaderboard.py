"""The leaderboard files: ``leaderboard.md``, ``leaderboard.json`` and ``ratings.png``."""
from __future__ import annotations

import json
from pathlib import Path

from medjax.arena.ratings import Rating


def markdown(ratings: list[Rating], info: dict) -> str:
    anchor = info.get("anchor")
    centre = f"{anchor} fixed at 1000" if anchor else "mean rating 1000"
    warning = [f"**Warning: {info['judge_warning']}.**", ""] if info.get("judge_warning") else []
    lines = [
        *warning,
        f"| rank | model | Elo | 95% CI | wins | ties | losses |",
        "|---:|---|---:|---|---:|---:|---:|",
    ]
    for rank, r in enumerate(ratings, 1):
        lines.append(f"| {rank} | {r.name} | {r.rating:.0f} | {r.low:.0f} – {r.high:.0f} | "
                     f"{r.wins:g} | {r.ties:g} | {r.losses:g} |")
    lines += ["", f"Bradley–Terry fit on the Elo scale (400 points = 10:1 odds), {centre}; "
                  f"95% intervals from {info['bootstrap_rounds']} bootstrap resamples of the "
                  f"{info['questions']} questions. {info['judgements']} judgements by "
                  f"`{info['judge']}` (each pair judged in both orders; scoring: {info.get('scoring', 'verdict')})."]
    return "\n".join(lines) + "\n"


def as_json(ratings: list[Rating], info: dict) -> dict:
    return {**info, "ratings": [{"rank": k, "model": r.name, "elo": round(r.rating, 1),
                                 "ci95": [round(r.low, 1), round(r.high, 1)], "wins": r.wins,
                                 "ties": r.ties, "losses": r.losses} for k, r in enumerate(ratings, 1)]}


def plot(ratings: list[Rating], path, title: str = "Clinical arena") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(reversed(ratings))                    # best at the top
    y = range(len(order))
    values = [r.rating for r in order]
    err = [[r.rating - r.low for r in order], [r.high - r.rating for r in order]]
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.45 * len(order)))
    ax.errorbar(values, y, xerr=err, fmt="o", capsize=4, color="tab:blue")
    for yi, r in zip(y, order):
        ax.annotate(f"{r.rating:.0f}", (r.rating, yi), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=8)
    ax.axvline(1000, color="grey", lw=0.8, ls="--")
    ax.set_yticks(list(y), [r.name for r in order])
    ax.set_xlabel("Elo (Bradley–Terry), 95% bootstrap interval")
    ax.set_title(title)
    ax.set_ylim(-0.7, len(order) - 0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write(ratings: list[Rating], info: dict, out_dir) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {"markdown": out / "leaderboard.md", "json": out / "leaderboard.json", "png": out / "ratings.png"}
    paths["markdown"].write_text(markdown(ratings, info), encoding="utf-8")
    paths["json"].write_text(json.dumps(as_json(ratings, info), indent=2) + "\n", encoding="utf-8")
    plot(ratings, paths["png"])
    return paths
