"""8 simulated CPU devices: gradient accumulation's strided micro-batches (training/step.py
``micro_batches``) keep every batch row on its device, and accumulate to the one-batch step.

* The compiled train step (built by ``medjax.plan.compile.abstract_step``, i.e. the trainer's own
  ``build_trainable`` → ``step_fn``) with ``grad_accum > 1`` has exactly the row-carrying
  collectives of the ``grad_accum = 1`` step on one micro-batch (none at all under fsdp_ep with a
  tiny Mixtral): the split itself moves no row. The old contiguous split, patched in here only,
  adds collective-permutes / all-gathers of rows, so the check can fail.
* ``grad_accum = 4`` and ``= 1`` give the same two losses (and gradient norms) on the same global
  batches, SFT and DPO, full and LoRA (dropout off: masks are drawn per micro-batch, so with
  dropout on the two runs draw different masks).

In-process on the session's 8 forced CPU devices (tests/conftest.py, marker ``multidevice``).
"""
from __future__ import annotations

import collections
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from medjax import sharding
from medjax.train import step as S

pytestmark = pytest.mark.multidevice

ROOT = Path(__file__).resolve().parents[2]
SEQ = 24        # no dimension of a tiny preset is 24: a collective of a shape with 24 carries batch rows
ROW_MOVING = ("all-gather", "all-to-all", "collective-permute")


def _cfg(recipe, *overrides):
    from medjax.config import load_config
    return load_config([str(ROOT / "configs" / f"{recipe}.yaml")],
                       ["model=tiny", f"data.seq_len={SEQ}", "lora.dropout=0",
                        "train.neftune_alpha=0", *overrides])


def _contiguous(batch, grad_accum):
    """The split before the strided one: micro-batch i = rows [i·m, (i+1)·m)."""
    return jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)


def row_collectives(hlo: str) -> collections.Counter:
    """``(op, result shapes)`` of every all-gather / all-to-all / collective-permute XLA inserted
    whose result has a ``SEQ``-long dimension (activations or batch arrays ``[rows, SEQ, ...]``).
    The MoE dispatch's own all-to-alls (written in a ``shard_map``: tokens to their experts'
    devices and back) are the expert-parallel transport, not a batch layout change: skipped."""
    found = collections.Counter()
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.+?)\s(" + "|".join(ROW_MOVING) + r")(-start)?\(", line)
        if not m or "/shard_map/" in line:
            continue
        shapes = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
        if any(str(SEQ) in dims.split(",") for dims in shapes):
            found[(m.group(2), m.group(1).split("{")[0])] += 1
    return found


def _compiled_text(cfg) -> str:
    from medjax.plan import model_config
    from medjax.plan.compile import abstract_step
    step, args = abstract_step(cfg, sharding.make_mesh(cfg.mesh), model_config(cfg))
    return step.lower(*args).compile().as_text()


def test_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py gives the session 8 CPU devices"


@pytest.mark.slow
@pytest.mark.parametrize("recipe, mesh, micro, accum", [
    ("melt_llama2_lora", ["mesh.preset=fsdp", "mesh.fsdp=2", "mesh.data=4"], 8, 4),
    ("meditron_llama2_cpt", ["mesh.preset=fsdp", "mesh.fsdp=8", "mesh.data=1", "mesh.tensor=1"], 16, 2),
])
def test_fsdp_step_moves_no_row_for_the_split(monkeypatch, recipe, mesh, micro, accum):
    """fsdp (LoRA / full): the accumulated step's row collectives are the one-micro-batch step's
    (GSPMD's own choices inside a tiny layer), the contiguous split's are more."""
    one = row_collectives(_compiled_text(_cfg(recipe, *mesh, f"train.batch_size={micro}",
                                              "train.grad_accum=1")))
    accumulated = _cfg(recipe, *mesh, f"train.batch_size={micro * accum}", f"train.grad_accum={accum}")
    strided = row_collectives(_compiled_text(accumulated))
    monkeypatch.setattr(S, "micro_batches", _contiguous)
    contiguous = row_collectives(_compiled_text(accumulated))
    assert strided == one, (strided - one, one - strided)
    assert sum(contiguous.values()) > sum(one.values()), contiguous


def test_expert_parallel_step_moves_no_row(monkeypatch):
    """fsdp_ep (fsdp=2 × expert=4), tiny Mixtral with LoRA on every expert: with 2 strided
    micro-batches no collective carries a batch row at all; the contiguous split's do."""
    cfg = _cfg("melt_mixtral_lora", "mesh.preset=fsdp_ep", "mesh.fsdp=2", "mesh.expert=4",
               "train.batch_size=16", "train.grad_accum=2")
    assert not row_collectives(_compiled_text(cfg))
    monkeypatch.setattr(S, "micro_batches", _contiguous)
    assert row_collectives(_compiled_text(cfg))


# ----------------------------------------------------------------------------- the same losses
def _rows(rng, rows, vocab):
    """Packed rows: two examples and padding per row; prompt tokens out of the loss."""
    ids = rng.integers(3, vocab, (rows, SEQ + 1))
    a = rng.integers(4, SEQ // 2, rows)
    b = a + rng.integers(4, SEQ // 2, rows)
    col = np.arange(SEQ)[None, :]
    seg = np.where(col < a[:, None], 1, np.where(col < b[:, None], 2, 0)).astype(np.int32)
    start = np.where(seg == 2, a[:, None], 0)
    return {"input_ids": (ids[:, :-1] * (seg > 0)).astype(np.int32),
            "targets": (ids[:, 1:] * (seg > 0)).astype(np.int32),
            "positions": np.where(seg > 0, col - start, 0).astype(np.int32), "segment_ids": seg,
            "loss_mask": ((seg > 0) & (col - start >= 2)).astype(np.float32)}


def _batches(objective, rows, vocab, steps=2):
    rng = np.random.default_rng(7)
    out = []
    for _ in range(steps):
        if objective == "dpo":
            out.append({f"{p}_{k}": v for p in ("chosen", "rejected")
                        for k, v in _rows(rng, rows, vocab).items()})
        else:
            out.append(_rows(rng, rows, vocab))
    return out


def _losses(cfg):
    from medjax.models import get_preset
    from medjax.train.setup import base_model
    from medjax.train.setup import build_trainable
    mesh = sharding.make_mesh(cfg.mesh)
    model, _ = base_model(cfg)
    t = build_trainable(cfg, model, mesh)
    state, out = t.state, []
    for batch in _batches(cfg.train.objective, cfg.train.batch_size,
                          get_preset(cfg.model.preset).vocab_size):
        state, metrics = t.step_fn(state, t.frozen, t.reference, sharding.global_batch(batch, mesh))
        out.append({k: float(v) for k, v in metrics.items()})
    return out


@pytest.mark.parametrize("recipe, lora", [
    pytest.param("melt_llama2_lora", True, marks=pytest.mark.slow),
    pytest.param("internist_mistral_cpt", False, marks=pytest.mark.slow),
    pytest.param("med42_dpo", False, marks=pytest.mark.slow),
    ("med42_dpo", True)])
def test_accumulated_losses_equal_one_batch(recipe, lora):
    """32 packed rows on fsdp=2 × data=4 (4 per device): 4 strided micro-batches of 8 rows (one
    per device) give the losses and gradient norms of one batch of 32, two optimizer steps."""
    common = ["mesh.preset=fsdp", "mesh.fsdp=2", "mesh.data=4", "train.batch_size=32",
              f"lora.enabled={str(lora).lower()}", "optim.lr=0.01", "optim.warmup_steps=0"]
    runs = []
    for accum in (1, 4):
        runs.append(_losses(_cfg(recipe, *common, f"train.grad_accum={accum}")))
    one, four = runs
    assert one[0]["loss"] != one[1]["loss"]                       # it trained
    for a, b in zip(one, four):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=f"{recipe} {key}")
