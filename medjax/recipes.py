"""The seed recipes (configs/<recipe>.yaml): tiny CPU runs of them, their eval, their memory plan.

    python -m medjax.train --config configs/internist_mistral_cpt.yaml model=tiny
    python -m medjax.recipes list
    python -m medjax.recipes plan [--recipe NAME] [--device h100 --num-devices 8]

``model=tiny`` (an override understood by ``python -m medjax.train`` and :func:`load_recipe`)
turns a full-size recipe into a CPU-sized run of the SAME family and method: the family's
``tiny-*`` preset (random init, byte-level tokenizer), fp32, a ``dp`` mesh, 10 steps of about 4
rows of 128 tokens (at least one row per micro-batch of the recipe's ``train.grad_accum``), a
larger learning rate without warmup, 2 items of the card's first eval task, and stand-in data
derived from the bundled medical instruction set (see :func:`tiny_data`). Everything else —
LoRA targets, quantization, NEFTune, DPO settings, activation checkpointing (``model.remat``),
gradient accumulation, packing, templates, eval tasks — is the card's. Overrides after
``model=tiny`` still win (e.g. ``model=tiny train.steps=30``).

Planned hardware per recipe (``plan``) is what the card describes or what it takes to fit:
see :data:`PLANNED_DEVICES` and docs/RECIPES.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

from medjax.tokenizer import byte_tokenizer, preset_tokenizer  # noqa: F401  (re-exported)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
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
    from medjax.training.sft_data import read_jsonl, resolve_data_path
    return read_jsonl(resolve_data_path(ASSET_INSTRUCT))


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
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return str(path)


def tiny_overrides(raw: dict, name: str) -> list[str]:
    """The dotted overrides ``model=tiny`` stands for, given the recipe's YAML dict."""
    model = raw.get("model") or {}
    preset = model.get("preset")
    if preset not in TINY_PRESETS and not str(preset).startswith("tiny"):
        raise ValueError(f"model=tiny: the config's model.preset {preset!r} names no family "
                         f"(known: {sorted(TINY_PRESETS)})")
    tiny = TINY_PRESETS.get(preset, preset)
    fmt = (raw.get("data") or {}).get("format", "text")
    lora = raw.get("lora") or {}
    # Sizes shrink, mechanisms stay: model.remat and train.grad_accum are the recipe's; the batch
    # keeps one or more rows per micro-batch. fp32 and XLA attention because this is a CPU run
    # (bf16 matmuls are emulated slowly on CPU; the fused kernels target GPU/TPU).
    grad_accum = int((raw.get("train") or {}).get("grad_accum", 1))
    batch = grad_accum * max(1, 4 // grad_accum)
    out = [f"model.preset={tiny}", "model.path=null", "model.dtype=float32", "model.param_dtype=float32",
           "model.attention=xla",
           f"data.train={tiny_data(fmt)}", "data.eval=null", "data.sources=[]", "data.seq_len=128",
           "data.on_error=skip",
           "train.steps=10", "train.epochs=null", f"train.batch_size={batch}",
           "train.heldout_examples=8", "train.max_examples=64", "train.eval_batches=2",
           f"train.out_dir=runs/tiny/{name}",
           "optim.lr=0.002", "optim.min_lr=0.0", "optim.warmup_steps=0",
           "mesh.preset=dp", "mesh.data=null", "mesh.fsdp=null", "mesh.tensor=null", "mesh.expert=null",
           "checkpoint.every=0", "checkpoint.async_save=false", "eval.limit=2"]
    tasks = (raw.get("eval") or {}).get("tasks") or []
    if tasks:                                   # one task of the card's list keeps CPU runs short
        out.append(f"eval.tasks=[{tasks[0]}]")
    data_template = (raw.get("data") or {}).get("chat_template")
    if (raw.get("eval") or {}).get("chat_template") == "default" and data_template:
        out.append(f"eval.chat_template={data_template}")   # the byte tokenizer ships no template
    if lora.get("enabled"):
        out.append("lora.rank=8")
    if fmt == "preference":                     # a chat-rendered pair in bytes needs more room
        out.append("data.seq_len=448")
    return out


def expand_overrides(config_path, overrides, *, check_inputs: bool = True) -> list[str]:
    """``overrides`` with ``model=tiny`` replaced (in place) by :func:`tiny_overrides`; for a
    recipe config (``train.recipe`` set), a missing base-model path or training data is a
    ``ConfigError`` saying what to set (instead of a random full-size init)."""
    overrides = list(overrides)
    if config_path is None:
        if "model=tiny" in overrides:
            raise ValueError("model=tiny needs --config (a recipe whose model.preset names the family)")
        return overrides
    if not Path(config_path).is_file():
        return overrides                        # load_config reports the missing file
    try:
        raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        from medjax.config import ConfigError
        raise ConfigError(f"{config_path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        return overrides                        # load_config reports the bad top level
    if "model=tiny" in overrides:
        i = overrides.index("model=tiny")
        overrides = overrides[:i] + tiny_overrides(raw, Path(config_path).stem) + overrides[i + 1:]
    if check_inputs:
        _check_recipe_inputs(raw, overrides, config_path)
    return overrides


def _check_recipe_inputs(raw: dict, overrides, config_path) -> None:
    from medjax.config import ConfigError, apply_overrides
    final = apply_overrides(raw, overrides)
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
    from medjax.config import load_config
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    return load_config(path, expand_overrides(path, overrides, check_inputs=check_inputs))


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medjax.recipes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the recipes and their config files")
    p = sub.add_parser("plan", help="per-device memory of each full-size recipe (jax.eval_shape)")
    p.add_argument("--recipe", action="append", choices=RECIPES, help="only this recipe (repeatable)")
    p.add_argument("--device", help="override the planned device (h100, h200, a100, v5p-64, ...)")
    p.add_argument("--num-devices", type=int, help="override the planned device count")
    args = ap.parse_args(argv)
    if args.command == "list":
        for name in RECIPES:
            device, count = PLANNED_DEVICES[name]
            print(f"{name:24s} configs/{name}.yaml  (planned: {count} x {device})")
        return 0
    for name in args.recipe or RECIPES:
        print(f"== {name}")
        print(plan_recipe(name, args.device, args.num_devices))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
