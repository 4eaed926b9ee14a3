"""Run in the CUDA venv (``make cuda-venv``): BiMediX's train step (configs/bimedix_mixtral_qlora.yaml:
nf4 double-quant QLoRA r=128 on Mixtral-8x7B, remat full, 16 micro-batches of 4096 tokens) with the
model cut to ``argv[1]`` layers, built by ``medjax.plan.compile`` (the trainer's own setup) and
compiled for one compile-only H100. Prints one JSON line of XLA's bytes per device.
"""
import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from medjax import plan as P  # noqa: E402
from medjax.plan import compile as plan_compile  # noqa: E402
from medjax.config import load_config  # noqa: E402


def main():
    layers = int(sys.argv[1])
    cfg = load_config(["configs/bimedix_mixtral_qlora.yaml"], sys.argv[2:])
    model_cfg = dataclasses.replace(P.model_config(cfg), num_layers=layers)
    r = plan_compile.compile_plan(cfg, "h100", 1, model_cfg=model_cfg,
                                  estimate_fn=lambda n: P.plan(cfg, n))
    print(json.dumps({k: r[k] for k in ("argument", "output", "alias", "temp", "total",
                                          "compile_seconds")} | {"layers": layers}))


if __name__ == "__main__":
    main()
