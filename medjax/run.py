"""A whole training run: base model → train → the config's eval → exports → ``summary.json``.

``run(cfg, resume=...)`` is everything ``python -m medjax.train`` does. It orchestrates the
layers below it (docs/ARCHITECTURE.md): the training loop (``train/loop.py``'s ``Trainer``) and
the benchmark scorer (``eval/configured.py``), which do not know about each other.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from medjax.config import RunConfig
from medjax.errors import ConfigError


def run(cfg: RunConfig, *, resume: bool = False, show_bar: bool = True) -> dict:
    """Train per ``cfg``; returns (and writes ``<out_dir>/summary.json``) the run summary."""
    from medjax.distributed import is_main_process
    from medjax.eval.configured import evaluate_section
    from medjax.outputs import write_file
    from medjax.sharding import make_mesh
    from medjax.train.loop import Trainer
    from medjax.train.objectives import objective_for
    from medjax.train.setup import base_model, check_layout, plain_model
    t0 = time.perf_counter()
    mesh = make_mesh(cfg.mesh)
    check_layout(cfg, mesh)                         # before any weights load, on every process
    model, tokenizer = base_model(cfg, mesh)
    trainer = Trainer(cfg, objective_for(cfg), model, tokenizer, show_bar=show_bar)
    del model                           # consumed: its loaded params were donated to the state
    out_dir = Path(cfg.train.out_dir)

    def evaluate(name):                 # the config's eval section on the merged, dequantized model
        return evaluate_section(cfg.eval, lambda: plain_model(trainer.model()), tokenizer,
                                out_dir / f"{name}.json")
    eval_before = None
    if not resume and trainer.ckpt.steps():
        raise ConfigError(f"{trainer.ckpt.directory} already holds checkpoints {trainer.ckpt.steps()}: "
                          f"continue with --resume, or choose another train.out_dir")
    if not (resume and trainer.resume()):
        if resume:
            print(f"no checkpoint in {trainer.ckpt.directory}; starting from step 0")
        if cfg.eval.before_training:
            eval_before = evaluate("eval_before")
    summary = trainer.train()
    summary["exports"] = trainer.export(cfg.train.export)
    if eval_before is not None:
        summary["eval_before"] = eval_before
    summary["eval"] = evaluate("eval")     # None if the config has no eval section
    summary["total_seconds"] = round(time.perf_counter() - t0, 2)
    summary["trainable_params"] = int(sum(x.size for x in jax.tree.leaves(trainer.state.params)))
    if not is_main_process():                 # one process writes the run's files
        return summary
    write_file(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
