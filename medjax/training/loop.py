"""The training loop: load → (LoRA) → data → jitted steps → checkpoints → eval → plot → export.

``run(cfg, resume=...)`` is everything ``python -m medjax.train`` does. Resuming restores the
train state, the RNG state and the data iterator position from the newest readable checkpoint,
so the loss sequence continues exactly as an uninterrupted run would have produced it.
A non-finite loss stops the run (``TrainingDiverged`` names the step and batch); the last
checkpoint written before it is the last good one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medjax.config import RunConfig
from medjax.training import step as S
from medjax.training.checkpoint import Checkpointer
from medjax.training.metrics import MetricsLogger, plot_run
from medjax.training.optimizer import make_optimizer


class TrainingDiverged(RuntimeError):
    """Loss became NaN/inf; the message names the step and the batch."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived: the step in flight finished and a checkpoint was written."""

    def __init__(self, signum: int, step: int, directory):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step}, checkpoint written to "
                         f"{directory}; continue with --resume")


class _StopOnSignal:
    """SIGTERM/SIGINT set a flag the loop checks after each step; a second signal acts as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for s, old in self._old.items():  # a second signal takes the old (default) action
            signal.signal(s, old)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def load_model(cfg: RunConfig):
    """``(model, tokenizer)`` from ``model.path`` (HF dir / .gguf / pkg://) or a random preset."""
    dtype, param_dtype = jnp.dtype(cfg.model.dtype), jnp.dtype(cfg.model.param_dtype)
    if cfg.model.path is not None:
        import medjax
        model, tokenizer = medjax.load(cfg.model.path, dtype=dtype, param_dtype=param_dtype,
                                       attention_impl=cfg.model.attention)
    else:
        from medjax.models import get_preset, init_decoder
        model = init_decoder(get_preset(cfg.model.preset), seed=cfg.train.seed, dtype=dtype,
                             param_dtype=param_dtype, attention_impl=cfg.model.attention)
        from medjax.recipes import preset_tokenizer
        tokenizer = preset_tokenizer(cfg.model.preset)    # byte-level for tiny-* presets, else None
    model.remat = cfg.model.remat
    return model, tokenizer


def _resolve(path) -> str:
    from medjax.loading import resolve_path
    return str(resolve_path(path))


def data_section(cfg: RunConfig):
    """``cfg.data`` with paths resolved; without ``data.eval`` the last ``train.heldout_examples``
    rows of ``data.train`` are the held-out split (``data.heldout_rows``, selected in memory)."""
    data = cfg.data
    if data.train is not None:
        data = dataclasses.replace(data, train=_resolve(data.train))
    if data.eval is not None:
        data = dataclasses.replace(data, eval=_resolve(data.eval))
    if data.eval is None and not data.sources and data.train is not None:
        data = dataclasses.replace(data, heldout_rows=cfg.train.heldout_examples)
    if cfg.train.max_examples is not None:
        data = dataclasses.replace(data, max_rows=cfg.train.max_examples)
    return data


def prepare_data(cfg: RunConfig, tokenizer):
    """``(train_iterator, heldout_batches, steps)`` from ``medjax.data.make_dataset``."""
    from medjax.data import make_dataset
    if tokenizer is None:
        raise ValueError("training on data needs a tokenizer: set model.path to a model with one")
    data = data_section(cfg)
    B = cfg.train.batch_size
    train = make_dataset(data, tokenizer, batch_size=B, seed=data.seed)
    has_eval = data.eval is not None or data.heldout_rows > 0
    heldout = list(make_dataset(data, tokenizer, batch_size=B, split="eval")) if has_eval else []
    steps = cfg.train.steps
    if cfg.train.epochs is not None:
        per_epoch = sum(1 for _ in make_dataset(data, tokenizer, batch_size=B, seed=data.seed, num_epochs=1))
        steps = cfg.train.epochs * max(per_epoch, 1)
    return train, heldout, steps


class Trainer:
    """Holds the split model, jitted functions and run directory of one training run."""

    def __init__(self, cfg: RunConfig, model, tokenizer, batches, heldout_batches, steps: int, *,
                 show_bar: bool = True):
        from medjax.sharding import make_mesh, rules_for
        self.cfg, self.tokenizer = cfg, tokenizer
        self.out_dir = Path(cfg.train.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.lora = cfg.lora.enabled
        if self.lora:
            from medjax.lora import apply_lora
            apply_lora(model, cfg.lora, seed=cfg.train.seed)
            if cfg.lora.quantize:                     # QLoRA: quantize the wrapped bases (quant.py)
                from medjax.quant import quantize_model
                print(quantize_model(model, cfg.lora.quantize, block=cfg.lora.quant_block,
                                     double_quant=cfg.lora.double_quant).summary())
        from medjax.training.neftune import attach_neftune
        attach_neftune(model, cfg.train.neftune_alpha, seed=cfg.train.seed)
        self.steps = steps
        self.tx, self.schedule = make_optimizer(cfg.optim, self.steps)
        self.graphdef, params, rngs, frozen = S.split_model(model, self.lora)
        self.mesh, self.rules = make_mesh(cfg.mesh), rules_for(cfg.mesh.preset)
        state = S.init_train_state(params, rngs, self.tx)
        self.step_fn, self.state_sh, frozen_sh = S.jit_train_step(
            state, frozen, mesh=self.mesh, rules=self.rules, graphdef=self.graphdef, tx=self.tx,
            schedule=self.schedule, grad_accum=cfg.train.grad_accum, aux_coef=cfg.train.aux_loss_coef)
        self.state = S.place(state, self.state_sh)
        self.frozen = S.place(frozen, frozen_sh)
        self.eval_fn = S.jit_eval_loss(self.state_sh.params, self.state_sh.rngs, frozen_sh,
                                       mesh=self.mesh, graphdef=self.graphdef)
        self.batches, self.heldout = batches, heldout_batches
        ckpt_dir = cfg.checkpoint.dir or self.out_dir / "checkpoints"
        self.ckpt = Checkpointer(ckpt_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                                 async_save=cfg.checkpoint.async_save)
        self.show_bar = show_bar
        self.start_step = 0

    # ------------------------------------------------------------------ state
    def resume(self) -> bool:
        restored = self.ckpt.restore(self.state)
        if restored is None:
            return False
        state, meta, step = restored
        self.state = S.place(state, self.state_sh)
        self.batches.set_state(meta["data"])
        self.start_step = step
        return True

    def save(self, step: int) -> None:
        meta = {"data": self.batches.get_state(), "step": step, "config": _jsonable(self.cfg.to_dict())}
        self.ckpt.save(step, self.state, meta)

    def model(self):
        """The current model (trained params merged back into the module graph)."""
        from flax import nnx
        return nnx.merge(self.graphdef, self.state.params, self.state.rngs, self.frozen)

    # ------------------------------------------------------------------ eval
    def heldout_loss(self, max_batches=None) -> float | None:
        batches = self.heldout if max_batches is None else self.heldout[:max_batches]
        if not batches:
            return None
        nll, tokens = 0.0, 0.0
        for b in batches:
            s, n = self.eval_fn(self.state.params, self.state.rngs, self.frozen, _model_batch(b))
            nll, tokens = nll + float(s), tokens + float(n)
        return nll / max(tokens, 1.0)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        cfg = self.cfg
        log = MetricsLogger(self.out_dir, total_steps=self.steps, start_step=self.start_step,
                            show_bar=self.show_bar)
        summary = {"steps": self.steps, "start_step": self.start_step}
        try:
            if self.start_step == 0:
                summary["heldout_loss_before"] = self.heldout_loss()
                if summary["heldout_loss_before"] is not None:
                    log.log(0, {"loss": summary["heldout_loss_before"]}, kind="eval")
                    log.write(f"held-out loss before training: {summary['heldout_loss_before']:.4f}")
            t0, tokens_total, last = time.perf_counter(), 0.0, {}
            stop = self._stop = _StopOnSignal().__enter__()
            skipped, consecutive = 0, 0
            for step in range(self.start_step, self.steps):
                batch_id = self.batches.get_state()
                batch = _model_batch(next(self.batches))
                self.state, metrics = self.step_fn(self.state, self.frozen, batch)
                metrics = {k: float(v) for k, v in metrics.items()}
                finite = all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm"))
                # optax.apply_if_finite dropped this update; it gives up after 5 in a row
                if not finite and cfg.optim.skip_nonfinite and consecutive < 5:
                    skipped, consecutive = skipped + 1, consecutive + 1
                    warnings.warn(f"non-finite loss {metrics['loss']} (grad_norm {metrics['grad_norm']}) "
                                  f"at step {step + 1}, batch {json.dumps(batch_id)}: update skipped "
                                  f"({skipped} skipped so far)", stacklevel=1)
                    finite = True
                else:
                    consecutive = 0 if finite else consecutive
                if not finite:
                    good = self.ckpt.steps()
                    raise TrainingDiverged(
                        f"non-finite loss {metrics['loss']} (grad_norm {metrics['grad_norm']}) at "
                        f"step {step + 1}, batch {json.dumps(batch_id)}; last good checkpoint: "
                        f"{good[-1] if good else 'none'} in {self.ckpt.directory}")
                tokens_total += metrics["tokens"]
                metrics = log.step(step + 1, metrics, float(np.sum(batch["segment_ids"] > 0)))
                last = metrics
                if (step + 1) % cfg.train.log_every == 0 or step + 1 == self.steps:
                    log.log(step + 1, metrics)
                if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < self.steps:
                    log.log(step + 1, {"loss": self.heldout_loss(cfg.train.eval_batches)}, kind="eval")
                if self.ckpt.should_save(step + 1) or step + 1 == self.steps or stop.signum:
                    self.save(step + 1)
                if stop.signum:
                    self.ckpt.wait()
                    raise TrainingInterrupted(stop.signum, step + 1, self.ckpt.directory)
            summary["skipped_nonfinite_steps"] = skipped
            self.ckpt.wait()
            elapsed = time.perf_counter() - t0
            summary.update(train_seconds=round(elapsed, 2), final_train_loss=last.get("loss"),
                           loss_tokens_per_s=round(tokens_total / max(elapsed, 1e-9), 1))
            summary["heldout_loss_after"] = self.heldout_loss()
            if summary["heldout_loss_after"] is not None:
                log.log(self.steps, {"loss": summary["heldout_loss_after"]}, kind="eval")
        finally:
            getattr(self, "_stop", _StopOnSignal()).__exit__()
            log.close()
            self.ckpt.close()
        summary["plot"] = str(plot_run(log.jsonl_path, self.out_dir / "loss_lr.png"))
        return summary

    # ------------------------------------------------------------------ export
    def export(self, kinds) -> dict:
        """Merged HF model (``save_hf``) and/or a PEFT adapter under ``<out_dir>/export``."""
        import medjax
        from medjax.lora import merged_model
        out = {}
        model = self.model()
        if "hf" in kinds:
            from medjax.quant import dequantize_model
            plain = merged_model(dequantize_model(model)) if self.lora else model
            path = medjax.save_hf(plain, self.out_dir / "export" / "hf", tokenizer=self.tokenizer,
                                  overwrite=True)
            out["hf"] = str(path)
        if "peft" in kinds and self.lora:
            from medjax.training.peft_export import save_peft
            try:
                out["peft"] = str(save_peft(model, self.out_dir / "export" / "peft",
                                            base_model_name_or_path=self.cfg.model.path))
            except NotImplementedError as e:
                out["peft_skipped"] = str(e)
        return out


def _model_batch(batch: dict) -> dict:
    return {k: jnp.asarray(batch[k]) for k in S.BATCH_KEYS}


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def run(cfg: RunConfig, *, resume: bool = False, show_bar: bool = True) -> dict:
    """Train per ``cfg``; returns (and writes ``<out_dir>/summary.json``) the run summary."""
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg)
    if cfg.train.objective == "dpo":                  # preference pairs: medjax/training/dpo.py
        from medjax.training.dpo import DpoTrainer
        trainer = DpoTrainer(cfg, model, tokenizer, show_bar=show_bar)
    else:
        trainer = Trainer(cfg, model, tokenizer, *prepare_data(cfg, tokenizer), show_bar=show_bar)
    from medjax.recipes import evaluate_run
    eval_before = None
    if not resume and trainer.ckpt.steps():
        from medjax.config import ConfigError
        raise ConfigError(f"{trainer.ckpt.directory} already holds checkpoints {trainer.ckpt.steps()}: "
                          f"continue with --resume, or choose another train.out_dir")
    if not (resume and trainer.resume()):
        if resume:
            print(f"no checkpoint in {trainer.ckpt.directory}; starting from step 0")
        if cfg.eval.before_training:
            eval_before = evaluate_run(cfg, trainer, name="eval_before")
    summary = trainer.train()
    summary["exports"] = trainer.export(cfg.train.export)
    if eval_before is not None:
        summary["eval_before"] = eval_before
    summary["eval"] = evaluate_run(cfg, trainer)     # the config's eval section (None if unset)
    summary["total_seconds"] = round(time.perf_counter() - t0, 2)
    summary["trainable_params"] = int(sum(x.size for x in jax.tree.leaves(trainer.state.params)))
    path = Path(cfg.train.out_dir) / "summary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return summary


def restore_trained_model(checkpoint_dir, step: int | None = None):
    """``(model, tokenizer, cfg, step)``: the model of a run rebuilt from its checkpoint directory
    (the run config is read from the checkpoint's metadata; LoRA wrappers included)."""
    import orbax.checkpoint as ocp
    from flax import nnx
    from medjax.config import RunConfig, build
    ckpt = Checkpointer(checkpoint_dir)
    steps = ckpt.steps()
    if not steps:
        raise FileNotFoundError(f"{ckpt.directory}: no checkpoints")
    meta = ckpt.manager.restore(step or steps[-1], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    cfg = build(RunConfig, meta["config"])
    model, tokenizer = load_model(cfg)
    if cfg.lora.enabled:
        from medjax.lora import apply_lora
        apply_lora(model, cfg.lora, seed=cfg.train.seed)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, params, rngs, frozen = S.split_model(model, cfg.lora.enabled)
    restored = ckpt.restore(S.init_train_state(params, rngs, tx), step=step)
    ckpt.close()
    state, _, got_step = restored
    model = nnx.merge(graphdef, state.params, state.rngs, frozen)
    return nnx.view(model, deterministic=True, raise_if_not_found=False), tokenizer, cfg, got_step
