"""``model=tiny``: a full-size recipe as a CPU-sized run of the SAME family and method.

``model=tiny`` (understood by :func:`medjax.config.load_config`, so by every command that takes
``--config``) adds the family's overlay ``configs/tiny/<family>.yaml`` as a second ``--config``
(giving that file yourself is the same run): the family's ``tiny-*`` preset (random init,
byte-level tokenizer), fp32, a ``dp`` mesh, 10 steps of 128-token rows, a larger learning rate
without warmup, 2 eval items. What depends on the recipe — stand-in data for its format, about 4
rows per step for its ``train.grad_accum``, its first eval task, ``runs/tiny/<recipe>`` — is
:func:`tiny_run_parts`. Everything else — LoRA targets, quantization, NEFTune, DPO settings,
activation checkpointing (``model.remat``), gradient accumulation, packing, templates — is the
card's. ``key=value`` overrides win (e.g. ``model=tiny train.steps=30``).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from medjax.errors import ConfigError
from medjax.outputs import write_file

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
TINY_DIR = CONFIG_DIR / "tiny"            # one overlay per family: configs/tiny/<family>.yaml
TINY_PRESETS = {"llama2-7b": "tiny-llama2", "llama2-70b": "tiny-llama2", "llama3-8b": "tiny-llama3",
                "llama3-70b": "tiny-llama3", "mistral-7b": "tiny-mistral", "mixtral-8x7b": "tiny-mixtral"}
ASSET_INSTRUCT = "pkg://medjax/assets/med_instruct.jsonl"


def _instruct_rows() -> list[dict]:
    from medjax.paths import resolve_path
    from medjax.data.jsonl import read_jsonl
    return read_jsonl(resolve_path(ASSET_INSTRUCT))


def tiny_data(fmt: str) -> str:
    """Stand-in training data for a tiny run of a recipe whose data has format ``fmt``.

    ``alpaca``/``chat``/``mcqa``: the bundled instruction set itself; ``text`` (continued
    pretraining): its rows as plain text; ``preference`` (DPO): pairs whose chosen answer is the
    row's own and whose rejected answer is the next row's (a wrong answer to the question).
    The derived files are written once to the temp dir (atomically) and reused."""
    if fmt not in ("text", "preference"):
        return ASSET_INSTRUCT
    rows = _instruct_rows()
    if fmt == "text":
        out_rows = [{"text": f"{r['instruction']}\n{r.get('input') or ''}\n{r['output']}".replace("\n\n", "\n")}
                    for r in rows]
    else:
        out_rows = [{"prompt": r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else ""),
                     "chosen": r["output"], "rejected": rows[(i + 1) % len(rows)]["output"]}
                    for i, r in enumerate(rows)]
    path = Path(tempfile.gettempdir()) / "medjax_tiny_data" / f"med_instruct_{fmt}.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in out_rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, text)
    return str(path)


def tiny_overlay(raw: dict) -> Path:
    """``configs/tiny/<family>.yaml`` for a config whose ``model.preset`` names the family."""
    preset = (raw.get("model") or {}).get("preset")
    tiny = TINY_PRESETS.get(preset) or (preset if str(preset).startswith("tiny-") else None)
    if tiny is None:
        raise ConfigError(f"model=tiny: the config's model.preset {preset!r} names no family (known: "
                          f"{sorted(TINY_PRESETS)}); or give --config configs/tiny/<family>.yaml")
    return TINY_DIR / f"{'llama2' if tiny == 'tiny-llama' else tiny.removeprefix('tiny-')}.yaml"


def tiny_run_parts(raw: dict, name: str) -> dict:
    """What a tiny run takes from the recipe it shrinks, as a config overlay.

    ``raw`` is the recipe's merged YAML (with the overrides), ``name`` the recipe (its file's
    stem). The family overlay (``configs/tiny/<family>.yaml``) holds everything fixed; this adds
    the four things that depend on the recipe:

    - ``data.train``: stand-in data for the recipe's ``data.format`` (:func:`tiny_data`); a
      chat-rendered preference pair in bytes needs ``data.seq_len`` 448;
    - ``train.batch_size``: about 4 rows, at least one per micro-batch of its ``train.grad_accum``;
    - ``eval.tasks``: its first task only (``eval.chat_template``: the data's template where the
      recipe asks for the model's own, which the byte tokenizer does not have);
    - ``train.out_dir``: ``runs/tiny/<name>``.
    """
    data, train, evaluation = (raw.get(k) or {} for k in ("data", "train", "eval"))
    fmt = data.get("format", "text")
    grad_accum = int(train.get("grad_accum", 1))
    parts = {"data": {"train": tiny_data(fmt)},
             "train": {"batch_size": grad_accum * max(1, 4 // grad_accum), "out_dir": f"runs/tiny/{name}"}}
    if fmt == "preference":
        parts["data"]["seq_len"] = 448
    if evaluation.get("tasks"):
        parts["eval"] = {"tasks": list(evaluation["tasks"][:1])}
    if evaluation.get("chat_template") == "default" and data.get("chat_template"):
        parts.setdefault("eval", {})["chat_template"] = data["chat_template"]
    return parts
