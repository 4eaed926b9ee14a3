"""Orbax checkpoints of a run: train state + JSON metadata (data iterator state, step, metrics).

Layout: ``<dir>/<step>/{state, meta}``. Orbax writes each step into a temporary directory and
renames it on commit, so a crash mid-save leaves the previous checkpoints intact; saves are
asynchronous (device→host copy blocks, the file write runs in the background). The state pytree
(``TrainState``: step, trainable params — adapters only for LoRA —, optimizer state, RNG state)
is saved as a flat ``{name: array}`` dict named by pytree path, and restored onto a template of
the same structure, so a mismatch (e.g. a different LoRA rank) is a clear error naming the key.
If the newest checkpoint cannot be read, restore warns and falls back to the previous one.
"""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from medjax.errors import CheckpointError


def _name(path) -> str:
    text = jax.tree_util.keystr(path, simple=True, separator=".")
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten_state(state) -> dict:
    """``{path_name: array}``; typed PRNG keys become their raw ``uint32`` data."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    out = {}
    for path, leaf in leaves:
        name = _name(path)
        if name in out:
            raise CheckpointError(f"duplicate checkpoint key {name!r}")
        out[name] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
    return out


_LAYER_INDEX = re.compile(r"\.layers\.\d+\.")


def _scan_layers_of(names) -> bool | None:
    """Which layer layout tensor names come from: False for per-layer ``layers.<i>.`` names
    (the loop), True for stacked ``layers.`` names (``model.scan_layers``), None without layers."""
    names = [n for n in names if ".layers." in f".{n}"]
    if not names:
        return None
    return not any(_LAYER_INDEX.search(f".{n}") for n in names)


def _missing_error(where: str, missing: list, template_names, saved_names) -> CheckpointError:
    ours, theirs = _scan_layers_of(template_names), _scan_layers_of(saved_names)
    if ours is not None and theirs is not None and ours != theirs:
        layout = lambda scan: "stacked layers (scan)" if scan else "one entry per layer (loop)"  # noqa: E731
        return CheckpointError(
            f"{where} holds {layout(theirs)} but this run uses {layout(ours)}: set "
            f"model.scan_layers={'true' if theirs else 'false'} to resume it")
    return CheckpointError(f"{where} lacks {missing[0]!r} (and {len(missing) - 1} more): was it "
                           "written by a different model / LoRA config?")


def unflatten_state(template, flat: dict):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    missing = [_name(p) for p, _ in leaves if _name(p) not in flat]
    if missing:
        raise _missing_error("checkpoint", missing, [_name(p) for p, _ in leaves], list(flat))
    restored = []
    for path, leaf in leaves:
        value = flat[_name(path)]
        if _is_key(leaf):
            value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf))
        elif tuple(np.shape(value)) != tuple(np.shape(leaf)):
            raise CheckpointError(f"checkpoint tensor {_name(path)!r} has shape {np.shape(value)}, "
                                  f"expected {np.shape(leaf)}")
        restored.append(value)
    return jax.tree.unflatten(treedef, restored)


def _abstract(flat: dict) -> dict:
    def spec(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    return {k: spec(v) for k, v in flat.items()}


class _OneLineOrbaxErrors(logging.Filter):
    """Orbax logs background-save failures with full tracebacks before re-raising them to us; keep
    its first line only: :meth:`Checkpointer.save` turns the failure into one clear error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":  # the same failure again, from each orphaned write task
            return "orbax" not in record.getMessage()
        if "orbax" in record.pathname and record.levelno >= logging.ERROR:
            record.msg, record.args = record.getMessage().splitlines()[0][:300], ()
            record.exc_info = record.exc_text = None
        return True


class Checkpointer:
    """Save every ``every`` steps, keep the last ``keep``; restore the newest readable one."""

    def __init__(self, directory, *, every: int = 100, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).resolve()
        self.every = every
        for logger in map(logging.getLogger, ("absl", "asyncio")):
            if not any(isinstance(f, _OneLineOrbaxErrors) for f in logger.filters):
                logger.addFilter(_OneLineOrbaxErrors())
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, meta: dict) -> None:
        flat = flatten_state(state)
        try:  # also surfaces a failure of the previous asynchronous save
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # noqa: BLE001 — disk full, permissions, quota: the user's to fix
            raise self._write_failed(step, e) from None

    def _write_failed(self, step, e: Exception) -> CheckpointError:
        """One line naming the directory and the OS reason (e.g. ENOSPC); earlier steps stay intact."""
        self._failed = True
        text = str(e)
        reason = next((r for r in ("No space left on device", "Disk quota exceeded", "Permission denied",
                                   "Read-only file system") if r in text), text.splitlines()[0][:200])
        failed_step = re.search(r"[/\\](\d+)\.orbax-checkpoint-tmp", text)
        step = int(failed_step.group(1)) if failed_step else step
        try:
            intact = [s for s in self.steps() if s != step]
        except Exception:  # noqa: BLE001
            intact = []
        return CheckpointError(f"cannot write checkpoint {self.directory / str(step)}: {reason}; "
                               f"the earlier checkpoints {intact} are intact")

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, template, step: int | None = None):
        """``(state, meta, step)`` from ``step`` or the newest readable checkpoint; None if none."""
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        flat_template = _abstract(flatten_state(template))
        for i, s in enumerate(candidates):
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(flat_template), meta=ocp.args.JsonRestore()))
                return unflatten_state(template, dict(out["state"])), dict(out["meta"]), s
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 — unreadable, or written by another config
                self._raise_if_mismatched(s, flat_template)
                if step is not None:
                    raise CheckpointError(f"{self.directory / str(s)}: cannot restore: {e}") from e
                older = candidates[i + 1] if i + 1 < len(candidates) else None
                warnings.warn(f"checkpoint {self.directory / str(s)} is unreadable "
                              f"({type(e).__name__}: {str(e)[:200]}); "
                              + (f"falling back to step {older}" if older is not None
                                 else "no older checkpoint left"), stacklevel=2)
        return None

    def _raise_if_mismatched(self, step: int, flat_template: dict) -> None:
        """A readable checkpoint whose tensors differ from the template is a config error."""
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore()))["state"]
        except Exception:  # noqa: BLE001 — really unreadable
            return
        missing = sorted(set(flat_template) - set(saved))
        if missing:
            raise _missing_error(f"checkpoint {self.directory / str(step)}", missing,
                                 list(flat_template), list(saved))
        for k, spec in flat_template.items():
            if tuple(np.shape(saved[k])) != tuple(spec.shape):
                raise CheckpointError(f"checkpoint tensor {k!r} has shape {np.shape(saved[k])}, "
                                      f"expected {spec.shape}")

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_failed("latest", e) from None

    def close(self) -> None:
        already_reported = getattr(self, "_failed", False)
        try:
            self.wait()
        except CheckpointError:
            if not already_reported:
                raise
        finally:
            self.manager.close()
