"""From a run config and a model to everything the train step needs — the one copy of that sequence.

    trainable = build_trainable(cfg, model, mesh)
    state, metrics = trainable.step_fn(trainable.state, trainable.frozen, trainable.reference, batch)

Contract of :func:`build_trainable` ``(cfg, model, mesh, *, objective=None, steps=None,
abstract=False) -> Trainable`` (the trainer, ``restore_trained_model``, the planner and the
benchmarks all call it; keep it stable):

1. **wrap** — LoRA adapters by module surgery (``cfg.lora``; ``medjax.lora.apply_lora``), in place;
2. **quantize** — the wrapped bases to int8/nf4 (``cfg.lora.quantize``; ``medjax.quant``), in place;
3. **NEFTune** — the noise module on the embeddings (``cfg.train.neftune_alpha``), in place;
4. **split** — ``graphdef``, trainable params (``nnx.LoRAParam`` with LoRA, else every
   ``nnx.Param``), RNG state, frozen rest (``training/step.py``);
5. **init** — optimizer + schedule (``cfg.optim`` over ``steps``, default ``cfg.train.steps``),
   ``TrainState`` with fp32 masters, and the objective's ``reference`` (DPO frozen copy or ``{}``);
6. **place** — shardings from ``cfg.mesh.preset``'s rules on ``mesh`` (``medjax.sharding``):
   the train state and reference come out of one jitted init with ``out_shardings`` (inputs
   donated), so no device holds more than its shards plus one op's temporaries.

A model from :func:`load_prepared` (checkpoint streamed into the mesh, prepared while loading)
skips steps 1–3.

Steps 1–3 are :func:`prepare_model` (also usable alone inside ``nnx.eval_shape``). ``model`` is
consumed: after the call use ``trainable.model()``. ``objective`` defaults to
``objectives.objective_for(cfg)``.

``abstract=True`` allocates nothing: ``model`` may be abstract (``nnx.eval_shape``), ``mesh`` may
be a ``jax.sharding.AbstractMesh`` or a mesh of compile-only devices; ``state`` / ``frozen`` /
``reference`` are then trees of ``jax.ShapeDtypeStruct`` carrying their shardings, so
``trainable.step_fn.lower(trainable.state, trainable.frozen, trainable.reference,
trainable.batch_spec(rows, seq_len)).compile()`` compiles the real step (planner / AOT).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from flax import nnx

from medjax.models.pipeline import LayerOrder
from medjax.train import step as S
from medjax.train.objectives import objective_for
from medjax.train.optimizer import make_optimizer


def check_layout(cfg, mesh) -> None:
    """Errors that would otherwise fail mid-run or hang a process at a barrier, raised on EVERY
    process before any weights load: a global batch the mesh's batch shards cannot split
    (``ConfigError``), heads / experts the tensor / expert axes cannot split (checked here for a
    preset's shapes; a checkpoint's are checked by the sharded load), processes started with
    different configs (``ConfigError``)."""
    from medjax.sharding import check_model, local_batch_rows
    local_batch_rows(mesh, cfg.train.batch_size)
    if cfg.model.preset:
        from medjax.models import get_preset
        check_model(get_preset(cfg.model.preset), dict(mesh.shape), cfg.train.pipeline_repeats)
    if jax.process_count() > 1:
        import hashlib
        import json

        import numpy as np
        from jax.experimental import multihost_utils

        from medjax.errors import ConfigError
        text = json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()
        digest = np.frombuffer(hashlib.sha256(text).digest()[:8], np.uint8)
        every = multihost_utils.process_allgather(digest).reshape(jax.process_count(), -1)
        differ = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
        if differ:
            raise ConfigError(f"processes {differ} were started with a different config than process 0 "
                              f"(same --config and key=value overrides needed on every process)")


def prepare_model(cfg, model):
    """Wrap (LoRA), quantize (QLoRA) and attach NEFTune, in place, as ``cfg`` says.
    Returns the quantization report (None without quantization)."""
    report = None
    if cfg.lora.enabled:
        from medjax.lora import apply_lora
        apply_lora(model, cfg.lora, seed=cfg.train.seed)
        if cfg.lora.quantize:
            from medjax.quant import quantize_model
            report = quantize_model(model, cfg.lora.quantize, block=cfg.lora.quant_block,
                                    double_quant=cfg.lora.double_quant)
    from medjax.train.neftune import attach_neftune
    attach_neftune(model, cfg.train.neftune_alpha, seed=cfg.train.seed)
    return report


def load_prepared(cfg, mesh):
    """``(model, tokenizer)``: ``model.path`` imported straight into ``mesh``'s shardings with
    :func:`prepare_model` already applied — LoRA wrappers, QLoRA bases quantized as they stream
    in (the float base never exists), NEFTune — so :func:`build_trainable` only splits and
    initialises. Each process reads each block its devices hold once (medjax/hf/load.py).
    Full fine-tuning reads the weights straight into the fp32 masters the optimizer updates.
    Safetensors directories and GGUF files alike."""
    import jax.numpy as jnp

    from medjax.hf.pretrained import load_pretrained
    from medjax.sharding import rules_of
    param_dtype = jnp.dtype(cfg.model.param_dtype) if cfg.lora.enabled else jnp.float32
    model, tokenizer = load_pretrained(cfg.model.path, dtype=jnp.dtype(cfg.model.dtype),
                                       param_dtype=param_dtype, attention_impl=cfg.model.attention,
                                       mesh=mesh, rules=rules_of(cfg.mesh),
                                       prepare=lambda m: prepare_model(cfg, m),
                                       scan_layers=cfg.model.scan_layers)
    model.prepared = True
    return model, tokenizer


def base_model(cfg, mesh=None):
    """``(model, tokenizer)`` a run starts from: ``model.path`` (HF dir / .gguf / pkg://) or a
    random ``model.preset``.

    With ``mesh``, a checkpoint streams straight into the run's shardings, already wrapped /
    quantized for training (:func:`load_prepared`); without, it loads whole on the default
    device (tests, benchmarks of one device)."""
    import jax.numpy as jnp
    dtype, param_dtype = jnp.dtype(cfg.model.dtype), jnp.dtype(cfg.model.param_dtype)
    if cfg.model.path is not None and mesh is not None:
        model, tokenizer = load_prepared(cfg, mesh)
    elif cfg.model.path is not None:
        from medjax.hf.pretrained import load_pretrained
        model, tokenizer = load_pretrained(cfg.model.path, dtype=dtype, param_dtype=param_dtype,
                                           attention_impl=cfg.model.attention,
                                           scan_layers=cfg.model.scan_layers)
    else:
        from medjax.models import get_preset, init_decoder
        from medjax.tokenizer import preset_tokenizer
        model = init_decoder(get_preset(cfg.model.preset), seed=cfg.train.seed, dtype=dtype,
                             param_dtype=param_dtype, attention_impl=cfg.model.attention,
                             scan_layers=cfg.model.scan_layers)
        tokenizer = preset_tokenizer(cfg.model.preset)    # byte-level for tiny-* presets, else None
    model.remat = cfg.model.remat
    return model, tokenizer


def plain_model(model, *, keep: bool = True):
    """A wrapper-free model for export / eval: quantized bases dequantized (to the compute dtype,
    the weights the forward used) with the adapters merged onto them in the same pass, one matrix
    at a time (``quant.dequantize_model``) — the base the adapters were trained against (the in-run
    and checkpoint exports are the same function of the same arrays); float bases merged in place.

    ``keep=False`` consumes ``model`` (merged in place): each adapted weight's old array is freed
    as its merged one is made, so the host holds one copy of the weights, not two (7B export)."""
    from medjax.lora import lora_modules, merge_lora, strip_lora
    from medjax.quant import dequantize_model
    if not lora_modules(model):
        return model
    # the clone shares the arrays; the merge makes new ones (``merged_model`` would clone again)
    model = nnx.clone(model) if keep else model
    return strip_lora(merge_lora(dequantize_model(model, merge_adapters=True)))


@dataclasses.dataclass
class Trainable:
    """A model split for training, its optimizer, its objective and its placement on ``mesh``."""
    cfg: Any
    graphdef: Any
    state: S.TrainState          # arrays on ``mesh`` (or ShapeDtypeStructs when abstract)
    frozen: Any
    reference: Any               # the objective's frozen extras (DPO frozen copy) or {}
    shardings: tuple             # (state, frozen, reference) NamedSharding trees
    tx: Any
    schedule: Any
    objective: Any
    mesh: Any
    rules: Any
    quant_report: Any = None
    # the order ``state`` / ``frozen`` / ``reference`` hold the stacked layers in: stage order
    # with ``train.pipeline_repeats`` > 1 (models/pipeline.py), else layer order. Checkpoints
    # (``to_logical`` before a save, ``to_stages`` after a restore) and :meth:`model` are in
    # layer order.
    layer_order: LayerOrder = LayerOrder()

    @functools.cached_property
    def step_fn(self):
        """``step_fn(state, frozen, reference, batch) -> (state, metrics)``: jitted, state donated."""
        fn, _ = S.jit_train_step(self.state, self.frozen, self.reference, mesh=self.mesh,
                                 rules=self.rules, graphdef=self.graphdef, tx=self.tx,
                                 schedule=self.schedule, objective=self.objective,
                                 grad_accum=self.cfg.train.grad_accum,
                                 pipelined=self.cfg.mesh.stage > 1)
        return fn

    @functools.cached_property
    def eval_fn(self):
        """``eval_fn(params, rngs, frozen, reference, batch) -> objective.eval_stats`` (sums)."""
        state_sh, frozen_sh, reference_sh = self.shardings
        return S.jit_eval_stats(state_sh.params, state_sh.rngs, frozen_sh, reference_sh,
                                mesh=self.mesh, graphdef=self.graphdef, objective=self.objective)

    def batch_spec(self, rows: int, seq_len: int) -> dict:
        """Abstract batch (``ShapeDtypeStruct`` with the batch sharding) for ``step_fn.lower``."""
        import jax.numpy as jnp

        from medjax.sharding import batch_sharding
        sh = batch_sharding(self.mesh)
        return {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if k.endswith("loss_mask")
                                        else jnp.int32, sharding=sh)
                for k in self.objective.batch_keys}

    def model(self, state: S.TrainState | None = None):
        """The module with ``state``'s (default: the current) trained params merged back in, its
        layers in layer order (a copy of the stacked ones when the state holds them in stage
        order): the model eval, generation, merges and exports get."""
        state = self.state if state is None else state
        params, frozen = self.layer_order.to_logical((state.params, self.frozen))
        model = nnx.merge(self.graphdef, params, state.rngs, frozen)
        model.pipeline_repeats = 1                     # its calls run the layer-order schedule
        return model


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build_trainable(cfg, model, mesh, *, objective=None, steps: int | None = None,
                    abstract: bool = False) -> Trainable:
    """wrap → quantize → NEFTune → split → init → place (see the module docstring)."""
    from medjax.sharding import check_model, rules_of
    objective = objective if objective is not None else objective_for(cfg)
    tx, schedule = make_optimizer(cfg.optim, steps if steps is not None else cfg.train.steps)
    rules = rules_of(cfg.mesh)
    check_model(model.config, dict(mesh.shape), cfg.train.pipeline_repeats)
    # micro-batched calls of the model run as a pipeline over the stage axis (models/pipeline.py)
    model.pipeline_stages, model.pipeline_repeats = cfg.mesh.stage, cfg.train.pipeline_repeats
    order = LayerOrder(cfg.mesh.stage, cfg.train.pipeline_repeats, model.config.num_layers)
    lora = cfg.lora.enabled

    def split_and_init(model):
        report = prepare_model(cfg, model)
        graphdef, params, rngs, frozen = S.split_model(model, lora)
        state = S.init_train_state(params, rngs, tx)
        return graphdef, state, frozen, objective.initial_reference(params), report

    if abstract:
        out = {}

        def build(model):
            graphdef, state, frozen, reference, _ = split_and_init(model)
            out["graphdef"] = graphdef
            return state, frozen, reference
        state, frozen, reference = nnx.eval_shape(build, model)
        graphdef, report = out["graphdef"], None
        shardings = tuple(S.tree_shardings(t, mesh, rules) for t in (state, frozen, reference))
        state, frozen, reference = (_abstract(t, sh) for t, sh in zip((state, frozen, reference), shardings))
    else:
        graphdef, state, frozen, reference, shardings, report = _init_sharded(
            cfg, model, mesh, rules, tx, objective, order)
    return Trainable(cfg=cfg, graphdef=graphdef, state=state, frozen=frozen, reference=reference,
                     shardings=shardings, tx=tx, schedule=schedule, objective=objective, mesh=mesh,
                     rules=rules, quant_report=report, layer_order=order)


def _init_sharded(cfg, model, mesh, rules, tx, objective, order: LayerOrder):
    """prepare (unless :func:`load_prepared` did) → split → the train state (fp32 masters,
    optimizer moments) and the objective's reference made by ONE jitted init with
    ``out_shardings``, the loaded params donated: each device creates only its shards, and an
    fp32 param becomes its master copy in place. The loaded (layer-order) params and frozen
    weights are put in ``order`` first, one stacked variable at a time."""
    from medjax.quant import quant_report
    from medjax.sharding import place, sharded_init
    if getattr(model, "prepared", False):
        report = quant_report(model, cfg.lora) if cfg.lora.quantize else None
    else:
        report = prepare_model(cfg, model)
    graphdef, params, rngs, frozen = S.split_model(model, cfg.lora.enabled)

    def init(params, rngs):
        return S.init_train_state(params, rngs, tx), objective.initial_reference(params)
    state_sh, reference_sh = (S.tree_shardings(t, mesh, rules) for t in jax.eval_shape(init, params, rngs))
    frozen_sh = S.tree_shardings(frozen, mesh, rules)
    # placed (a no-op when loaded sharded), then in the train state's layer order
    frozen = order.to_stages(place(frozen, frozen_sh), donate=True)
    params = order.to_stages(place(params, S.tree_shardings(params, mesh, rules)), donate=True)
    state, reference = sharded_init(init, params, place(rngs, S.tree_shardings(rngs, mesh, rules)),
                                    out_shardings=(state_sh, reference_sh))
    return graphdef, state, frozen, reference, (state_sh, frozen_sh, reference_sh), report
