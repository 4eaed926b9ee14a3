"""The seed recipes (configs/<recipe>.yaml): tiny CPU runs of them, their eval, their memory plan.

    python -m medjax.train --config configs/internist_mistral_cpt.yaml model=tiny
    python -m medjax.recipes list                 # the CLI: medjax/recipes/__main__.py
    python -m medjax.recipes plan [--recipe NAME] [--device h100 --num-devices 8]

``model=tiny`` turns a full-size recipe into a CPU-sized run of the same family and method; it is
the config loader's (``medjax.config.tiny``), so every command that takes ``--config`` understands it.

Planned hardware per recipe (``plan``) is what the card describes or what it takes to fit:
see :data:`PLANNED_DEVICES` and docs/RECIPES.md.
"""
from __future__ import annotations

from pathlib import Path

from medjax.config import CONFIG_DIR, load_config

RECIPES = ("melt_mixtral_lora", "melt_llama2_lora", "internist_mistral_cpt", "bimedix_mixtral_qlora",
           "med42_llama3_sft", "med42_dpo", "meditron_llama2_cpt")
# (device, count) each recipe is planned for by `python -m medjax.recipes plan`
PLANNED_DEVICES = {"melt_mixtral_lora": ("h100", 8), "melt_llama2_lora": ("h100", 1),
                   "internist_mistral_cpt": ("h100", 8), "bimedix_mixtral_qlora": ("h100", 1),
                   "med42_llama3_sft": ("h100", 8), "med42_dpo": ("h100", 8),
                   "meditron_llama2_cpt": ("h100", 8)}


def load_recipe(name_or_path, overrides=(), *, check_inputs: bool = True):
    """A recipe's RunConfig (``name`` = configs/<name>.yaml), ``model=tiny`` understood;
    ``check_inputs=False`` skips the model-path / data checks (planning needs shapes only)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    return load_config(path, overrides, check_inputs=check_inputs)


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
