"""A trained model rebuilt from its run's checkpoint directory, exactly as it trained.

``medjax.load`` / ``medjax.loading.load_run`` are the way in from a path (they find the
checkpoint directory of a run directory); this is the train-side mechanism they call.
"""
from __future__ import annotations

import dataclasses

from medjax.errors import CheckpointError
from medjax.train.checkpoint import Checkpointer
from medjax.train.setup import base_model, build_trainable


def restore_trained_model(checkpoint_dir, step: int | None = None, mesh_overrides=()):
    """``(model, tokenizer, cfg, step)``: the model of a run rebuilt from its checkpoint directory
    exactly as it trained — the run config is read from the checkpoint's metadata and
    ``setup.build_trainable`` repeats the run's wrap / quantize / NEFTune / split (so a QLoRA run's
    adapters sit on the same quantized base). Dropout and NEFTune are off in the returned view.
    ``mesh_overrides`` (``mesh.*`` ``key=value`` flags, ``config.mesh_overrides``) change the
    run's mesh (orbax restores into the new shardings); the returned ``cfg.mesh`` is that one."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from medjax.config import RunConfig, build, mesh_overrides as with_mesh_flags
    from medjax.sharding import make_mesh
    from medjax.train.objectives import CausalLM
    ckpt = Checkpointer(checkpoint_dir)
    steps = ckpt.steps()
    if not steps:
        raise CheckpointError(f"{ckpt.directory}: no checkpoints")
    meta = ckpt.manager.restore(step or steps[-1], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    cfg = build(RunConfig, meta["config"])
    # the model serves inference: one pipeline pass (GPipe) over its layers held in layer order,
    # the checkpoint's, whatever the run's repeats; so the train step's pipeline shapes relax
    mesh_cfg = with_mesh_flags(mesh_overrides, cfg.mesh) if mesh_overrides else cfg.mesh
    accum = max(cfg.train.grad_accum, mesh_cfg.stage)
    train = dataclasses.replace(cfg.train, pipeline_repeats=1, grad_accum=accum,
                                batch_size=-(-cfg.train.batch_size // accum) * accum)
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg, train=train)
    mesh = make_mesh(cfg.mesh)
    model, tokenizer = base_model(cfg, mesh)
    trainable = build_trainable(cfg, model, mesh, objective=CausalLM())
    restored = ckpt.restore(trainable.state, step=step)
    ckpt.close()
    if restored is None:
        raise CheckpointError(f"{ckpt.directory}: no readable checkpoint among steps {steps}")
    state, _, got_step = restored
    model = trainable.model(state)
    return nnx.view(model, deterministic=True, raise_if_not_found=False), tokenizer, cfg, got_step
