"""The seed recipes (configs/<recipe>.yaml): tiny CPU runs of them, their eval, their memory plan.

    python -m medjax.train --config configs/internist_mistral_cpt.yaml model=tiny
    python -m medjax.recipes list                 # the CLI: medjax/recipes/__main__.py
    python -m medjax.recipes plan [--recipe NAME] [--device h100 --num-devices 8]

``model=tiny`` (understood by ``python -m medjax.train`` and :func:`load_recipe`) turns a
full-size recipe into a CPU-sized run of the SAME family and method by adding the family's overlay
``configs/tiny/<family>.yaml`` as a second ``--config`` (giving that file yourself is the same
run): the family's ``tiny-*`` preset (random init, byte-level tokenizer), fp32, a ``dp`` mesh, 10
steps of 128-token rows, a larger learning rate without warmup, 2 eval items. What depends on the
recipe — stand-in data for its format, about 4 rows per step for its ``train.grad_accum``, its
first eval task, ``runs/tiny/<recipe>`` — is :func:`tiny_run_parts`. Everything else — LoRA
targets, quantization, NEFTune, DPO settings, activation checkpointing (``model.remat``),
gradient accumulation, packing, templates — is the card's. ``key=value`` overrides win (e.g.
``model=tiny train.steps=30``).

Planned hardware per recipe (``plan``) is what the card describes or what it takes to fit:
see :data:`PLANNED_DEVICES` and docs/RECIPES.md.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from medjax.errors import ConfigError
from medjax.outputs import write_file
from medjax.tokenizer import byte_tokenizer, preset_tokenizer  # noqa: F401  (re-exported)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
TINY_DIR = CONFIG_DIR / "tiny"            # one overlay per family: configs/tiny/<family>.yaml
RECIPES = ("melt_mixtral_lora", "melt_llama2_lora", "internist_mistral_cpt", "bimedix_mixtral_qlora",
           "med42_llama3_sft", "med42_dpo", "meditron_llama2_cpt")
TINY_PRESETS = {"llama2-7b": "tiny-llama2", "llama2-70b": "tiny-llama2", "llama3-8b": "tiny-llama3",
                "llama3-70b": "tiny-llama3", "mistral-7b": "tiny-mistral", "mixtral-8x7b": "tiny-mixtral"}
# (device, count) each recipe is planned for by `python -m medjax.recipes plan`
PLANNED_DEVICES = {"melt_mixtral_lora": ("h100", 8), "melt_llama2_lora": ("h100", 1),
                   "internist_mistral_cpt": ("h100", 8), "bimedix_mixtral_qlora": ("h100", 1),
                   "med42_llama3_sft": ("h100", 8), "med42_dpo": ("h100", 8),
                   "meditron_llama2_cpt": ("h100", 8)}
ASSET_INSTRUCT = "pkg://medjax/assets/med_instruct.jsonl"


# ----------------------------------------------------------------------------- tiny runs
def _instruct_rows() -> list[dict]:
    from medjax.paths import resolve_path
    from medjax.train.sft_data import read_jsonl
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


def load_run_config(config=None, overrides=(), *, check_inputs: bool = True):
    """The ``RunConfig`` of ``--config`` file(s) (merged in order) and ``key=value`` overrides, as
    ``python -m medjax.train`` reads it.

    ``model=tiny`` among the overrides adds the family's tiny overlay after the files. With a
    tiny overlay among the files (added so, or given), :func:`tiny_run_parts` of the recipe (the
    first file) goes on top of them; the overrides come last and win. For a recipe config
    (``train.recipe`` set, not tiny), a missing base-model path or training data is a
    ``ConfigError`` saying what to set (instead of a random full-size init). ``train.steps=N``
    among the overrides wins over ``train.epochs`` from the files (:func:`explicit_steps_win`)."""
    from medjax.config import RunConfig, apply_overrides, build, config_paths, merge, read_yaml
    paths, overrides = config_paths(config), explicit_steps_win(overrides)
    raw: dict = {}
    for path in paths:
        raw = merge(raw, read_yaml(path))
    if "model=tiny" in overrides:
        overrides.remove("model=tiny")
        if not paths:
            raise ConfigError("model=tiny needs --config (a recipe whose model.preset names the family)")
        overlay = tiny_overlay(raw)
        paths.append(overlay)
        raw = merge(raw, read_yaml(overlay))
    if any(Path(p).resolve().parent == TINY_DIR for p in paths):
        raw = merge(raw, tiny_run_parts(apply_overrides(raw, overrides), Path(paths[0]).stem))
    final = apply_overrides(raw, overrides)
    if check_inputs and paths:
        _check_recipe_inputs(final, paths[0])
    return build(RunConfig, final)


def explicit_steps_win(overrides) -> list:
    """``train.steps=N`` given as an override ends an epoch count set in a config file (a recipe's
    ``train.epochs: 3`` would otherwise decide the length and silently ignore it); both given as
    overrides is a ConfigError naming the two keys."""
    from medjax.config import parse_override
    overrides = list(overrides)
    given = {".".join(keys): value for keys, value in map(parse_override, (o for o in overrides if "=" in o))}
    if "train.steps" not in given:
        return overrides
    if given.get("train.epochs") is not None:
        raise ConfigError(f"train.steps={given['train.steps']} and train.epochs={given['train.epochs']} "
                          f"both given: the run length is one or the other; drop one of them")
    return overrides + ["train.epochs=null"]


def _check_recipe_inputs(final: dict, config_path) -> None:
    if not (final.get("train") or {}).get("recipe"):
        return
    model, data = final.get("model") or {}, final.get("data") or {}
    preset = str(model.get("preset"))
    if model.get("path") is None and not preset.startswith("tiny"):
        raise ConfigError(f"{config_path}: model.path is required: give the card's base model "
                          f"(a local HF directory) as model.path=..., or add model=tiny for a "
                          f"CPU-sized run of the same recipe")
    if data.get("train") is None and not data.get("sources"):
        raise ConfigError(f"{config_path}: data.train is required: give your training data as "
                          f"data.train=FILE (format {data.get('format', 'text')!r}), or add "
                          f"model=tiny for a CPU-sized run on stand-in data")


def load_recipe(name_or_path, overrides=(), *, check_inputs: bool = True):
    """A recipe's RunConfig (``name`` = configs/<name>.yaml), ``model=tiny`` understood;
    ``check_inputs=False`` skips the model-path / data checks (planning needs shapes only)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    return load_run_config(path, overrides, check_inputs=check_inputs)


# ----------------------------------------------------------------------------- planning
def plan_recipe(name: str, device: str | None = None, num_devices: int | None = None) -> str:
    """``medjax.plan``'s per-device memory report for a full-size recipe on its planned mesh."""
    from medjax import plan as planner
    cfg = load_recipe(name, check_inputs=False)
    planned_device, planned_count = PLANNED_DEVICES.get(name, ("h100", 1))
    device = device or planned_device
    kind, device_bytes, slice_count = planner.parse_device(device)
    count = num_devices or slice_count or planned_count
    p = planner.plan(cfg, count)
    return planner.report(cfg, p, device, device_bytes)
