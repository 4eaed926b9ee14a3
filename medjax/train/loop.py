"""The training loop: setup → data → jitted steps → checkpoints → held-out loss → plot → export.

``medjax.run.run(cfg, resume=...)`` (everything ``python -m medjax.train`` does: load, train,
the config's eval, exports, summary.json) drives it. ONE :class:`Trainer` runs
every objective (``training/objectives.py``: causal LM, DPO); ``training/setup.py`` builds the
trainable model (wrap → quantize → NEFTune → split → init → place). Resuming restores the
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
from medjax.errors import CheckpointError, ConfigError, DataError
from medjax.ops.target import settle
from medjax.train.checkpoint import Checkpointer
from medjax.train.metrics import MetricsLogger, plot_run
from medjax.train.setup import build_trainable, plain_model


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


def _resolve(path) -> str:
    from medjax.paths import resolve_path
    return str(resolve_path(path))


def data_section(cfg: RunConfig):
    """``cfg.data`` with paths resolved (``pkg://`` included). Without ``data.eval`` the last
    ``data.heldout_rows`` rows of ``data.train`` are the held-out split (selected in memory)."""
    data = cfg.data
    if data.train is not None:
        data = dataclasses.replace(data, train=_resolve(data.train))
    if data.eval is not None:
        data = dataclasses.replace(data, eval=_resolve(data.eval))
    return data


def prepare_data(cfg: RunConfig, tokenizer, mesh=None):
    """``(train_iterator, heldout_batches, steps)`` from ``medjax.data.make_dataset``; with
    ``mesh``, each process loads the block of rows its devices hold (``sharding.data_blocks``:
    processes that differ only along ``stage`` load the same rows)."""
    import functools

    from medjax.data import make_dataset
    if tokenizer is None:
        raise ConfigError("training on data needs a tokenizer: set model.path to a model with one")
    data = data_section(cfg)
    B = cfg.train.batch_size
    if mesh is not None:
        from medjax.sharding import data_blocks
        index, count = data_blocks(mesh, B)
        make_dataset = functools.partial(make_dataset, process_index=index, process_count=count)
    bench_dir = cfg.eval.data_dir           # the test files data.decontaminate removes from training
    train = make_dataset(data, tokenizer, batch_size=B, seed=data.seed, benchmarks_dir=bench_dir)
    has_eval = data.eval is not None or data.heldout_rows > 0
    heldout = list(make_dataset(data, tokenizer, batch_size=B, split="eval")) if has_eval else []
    steps = cfg.train.steps
    if cfg.train.epochs is not None:
        per_epoch = sum(1 for _ in make_dataset(data, tokenizer, batch_size=B, seed=data.seed, num_epochs=1,
                                                benchmarks_dir=bench_dir))
        steps = cfg.train.epochs * max(per_epoch, 1)
    return train, heldout, steps


class Trainer:
    """One training run of any objective: the trainable model (``setup.build_trainable``), its data,
    jitted step and eval, checkpoints and run directory."""

    def __init__(self, cfg: RunConfig, objective, model, tokenizer, *, show_bar: bool = True):
        from medjax.sharding import global_batch, make_mesh
        self.load_peak_rss_gib = _peak_rss_gib()      # the model is in: the load's high-water mark
        self.cfg, self.objective, self.tokenizer = cfg, objective, tokenizer
        self.out_dir = Path(cfg.train.out_dir)     # made once the data and model are known good
        self.lora = cfg.lora.enabled
        mesh = make_mesh(cfg.mesh)
        self.batches, self.heldout, self.steps = prepare_data(cfg, tokenizer, mesh)
        if self.heldout:   # the global batch: a process's own rows may all be padding
            objective.check_batch(global_batch(self.heldout[0], mesh))
        self.trainable = build_trainable(cfg, model, mesh, objective=objective, steps=self.steps)
        from medjax.sharding import data_blocks
        self.data_blocks = data_blocks(mesh, cfg.train.batch_size)[1]   # distinct row blocks
        if self.trainable.quant_report is not None:
            print(self.trainable.quant_report.summary())
        self.state, self.frozen, self.reference = (self.trainable.state, self.trainable.frozen,
                                                   self.trainable.reference)
        self.step_fn = self.trainable.step_fn     # step_fn(state, frozen, reference, batch)
        self.out_dir.mkdir(parents=True, exist_ok=True)
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
        from medjax.sharding import place
        # checkpoints hold the layers in layer order, the train state in its own (setup.Trainable)
        self.state = self.trainable.layer_order.to_stages(
            place(state, self.trainable.shardings[0]), donate=True)
        self.batches.set_state(_saved_data_state(meta["data"]))
        self.start_step = step
        return True

    def save(self, step: int) -> None:
        meta = {"data": _same_on_every_host(self.batches.get_state()), "step": step,
                "config": _jsonable(self.cfg.to_dict())}
        self.ckpt.save(step, self.trainable.layer_order.to_logical(self.state), meta)

    def model(self):
        """The current model (trained params merged back into the module graph, layer order)."""
        return self.trainable.model(self.state)

    # ------------------------------------------------------------------ eval
    def heldout_metrics(self, max_batches=None) -> dict:
        """``objective.eval_metrics`` over the held-out batches (``{}`` without held-out data)."""
        batches = self.heldout if max_batches is None else self.heldout[:max_batches]
        settle(self.state)          # one program per batch, all reading the step just dispatched
        total = None
        for b in batches:
            s = self.trainable.eval_fn(self.state.params, self.state.rngs, self.frozen, self.reference,
                                       self._batch(b))
            total = s if total is None else jax.tree.map(jnp.add, total, s)
        return {k: float(v) for k, v in self.objective.eval_metrics(total).items()} if total else {}

    def heldout_loss(self, max_batches=None) -> float | None:
        return self.heldout_metrics(max_batches).get("loss")

    def _batch(self, batch: dict) -> dict:
        """This host's rows → global arrays on the batch sharding (``make_array_from_process_local_data``)."""
        from medjax.sharding import global_batch
        return global_batch({k: np.asarray(batch[k]) for k in self.objective.batch_keys},
                            self.trainable.mesh)

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        cfg = self.cfg
        from medjax.distributed import is_main_process
        log = MetricsLogger(self.out_dir, total_steps=self.steps, start_step=self.start_step,
                            show_bar=self.show_bar, writer=is_main_process())
        summary = {"steps": self.steps, "start_step": self.start_step, "objective": self.objective.name,
                   "load_peak_rss_gib": self.load_peak_rss_gib,
                   "setup_peak_rss_gib": _peak_rss_gib()}     # the load + setup high-water mark
        try:
            if self.start_step == 0:
                summary["heldout_before"] = before = self.heldout_metrics()
                summary["heldout_loss_before"] = before.get("loss")
                if before:
                    log.log(0, before, kind="eval")
                    log.write(f"held-out loss before training: {before['loss']:.4f}")
            t0, tokens_total, last = time.perf_counter(), 0.0, {}
            stop = self._stop = _StopOnSignal().__enter__()
            skipped, consecutive = 0, 0
            for step in range(self.start_step, self.steps):
                batch_id = self.batches.get_state()
                local = next(self.batches)
                batch = self._batch(local)
                self.state, metrics = self.step_fn(self.state, self.frozen, self.reference, batch)
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
                real_tokens = self.data_blocks * sum(float(np.sum(np.asarray(local[k]) > 0))
                                                        for k in batch if k.endswith("segment_ids"))
                metrics = log.step(step + 1, metrics, real_tokens)
                last = metrics
                if (step + 1) % cfg.train.log_every == 0 or step + 1 == self.steps:
                    log.log(step + 1, metrics)
                if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < self.steps:
                    log.log(step + 1, self.heldout_metrics(cfg.train.eval_batches), kind="eval")
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
            summary["heldout_after"] = after = self.heldout_metrics()
            summary["heldout_loss_after"] = after.get("loss")
            if after:
                log.log(self.steps, after, kind="eval")
        finally:
            getattr(self, "_stop", _StopOnSignal()).__exit__()
            log.close()
            self.ckpt.close()
        if is_main_process():
            summary["plot"] = str(plot_run(log.jsonl_path, self.out_dir / "loss_lr.png"))
        return summary

    # ------------------------------------------------------------------ export
    def export(self, kinds) -> dict:
        """Merged HF model (``save_hf``) and/or a PEFT adapter under ``<out_dir>/export``."""
        from medjax.hf.export import save_hf
        out = {}
        model = self.model()
        if "hf" in kinds:
            plain = plain_model(model)
            path = save_hf(plain, self.out_dir / "export" / "hf", tokenizer=self.tokenizer,
                                  overwrite=True)
            out["hf"] = str(path)
        if "peft" in kinds and self.lora:
            from medjax.hf.peft_export import save_peft
            try:
                out["peft"] = str(save_peft(model, self.out_dir / "export" / "peft",
                                            base_model_name_or_path=self.cfg.model.path))
            except NotImplementedError as e:
                out["peft_skipped"] = str(e)
        return out


def _same_on_every_host(data_state: dict) -> dict:
    """The iterator state, checked to be the same on every process (each one walks the same global
    batch stream; a difference means the processes read different data files)."""
    if jax.process_count() == 1:
        return data_state
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(data_state, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    differ = [p for p, (row, n) in enumerate(zip(rows, sizes)) if bytes(row[:n]) != raw.tobytes()]
    if differ:
        raise DataError(f"processes {differ} are at another position of the training data than process "
                        f"{jax.process_index()}: every process must read the same data files")
    return data_state


def _saved_data_state(saved) -> dict:
    """The iterator state of a checkpoint: one dict, valid for any number of processes. (Before
    2026-12-06 multi-process runs saved a list of per-host positions in per-host row streams.)"""
    if isinstance(saved, dict):
        return saved
    if len(saved) != 1:
        raise CheckpointError(f"the checkpoint holds the per-process data positions of {len(saved)} processes, "
                              "written by an older medjax whose processes read other rows: its data position "
                              "cannot be resumed; start the run again")
    return saved[0]


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux ``ru_maxrss``: KiB)."""
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
