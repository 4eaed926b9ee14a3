"""``python -m medjax.recipes list | plan``: the seed recipes and their per-device memory plans
(the library: medjax/recipes/__init__.py)."""
from __future__ import annotations

import argparse
import sys

from medjax import recipes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medjax.recipes", description=recipes.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the recipes and their config files")
    p = sub.add_parser("plan", help="per-device memory of each full-size recipe (jax.eval_shape)")
    p.add_argument("--recipe", action="append", choices=recipes.RECIPES, help="only this recipe (repeatable)")
    p.add_argument("--device", help="override the planned device (h100, h200, a100, v5p-64, ...)")
    p.add_argument("--num-devices", type=int, help="override the planned device count")
    args = ap.parse_args(argv)
    if args.command == "list":
        for name in recipes.RECIPES:
            device, count = recipes.PLANNED_DEVICES[name]
            print(f"{name:24s} configs/{name}.yaml  (planned: {count} x {device})")
        return 0
    for name in args.recipe or recipes.RECIPES:
        print(f"== {name}")
        print(recipes.plan_recipe(name, args.device, args.num_devices))
        print()
    return 0


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
