"""Expert parallelism through the product path: ``python -m medjax.train`` (tiny Mixtral, MELT's
LoRA-on-every-expert recipe) on 8 simulated CPU devices with ``mesh.preset=fsdp_ep fsdp=2
expert=4`` trains with the same per-step losses as on one device, its compiled train step moves
tokens with all-to-alls and gathers nothing across the ``expert`` axis, and an ``expert`` axis
that does not divide the experts is one ``error:`` line.

The layer-level checks (forward and every gradient for full fine-tuning, LoRA on experts and
router, QLoRA nf4 + double quant and int8, remat; both transports; the planner's all-to-all bytes
against the compiled HLO) are tests/distributed/test_expert_parallel_layers.py (in-process, 8 devices).
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import hlo_groups

ROOT = Path(__file__).resolve().parents[2]
EP_MESH = ["mesh.preset=fsdp_ep", "mesh.fsdp=2", "mesh.expert=4"]
MESH_SHAPE = (1, 1, 2, 1, 4)       # (stage, data, fsdp, tensor, expert), medjax.sharding.MESH_AXES
EXPERT_AXIS = 4
RUN = ["lora.dropout=0", "train.steps=3", "train.batch_size=8", "train.grad_accum=1",
       "train.export=[]", "eval.tasks=[]", "data.heldout_rows=0", "data.seq_len=32"]


def _train(out_dir, devices: int, *extra, dump: Path | None = None):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    if dump is not None:
        flags += f" --xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*traced.*"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    cmd = [sys.executable, "-m", "medjax.train", *_argv(out_dir, *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _argv(out_dir, *extra) -> list[str]:
    """``python -m medjax.train``'s arguments: MELT-Mixtral at tiny size, ``RUN``, ``extra``."""
    return ["--no-progress", "--config", str(ROOT / "configs" / "melt_mixtral_lora.yaml"),
            "model=tiny", *RUN, f"train.out_dir={out_dir}", *extra]


def _losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


def _one_device_losses(out_dir, *extra):
    """The 1-device reference: ``python -m medjax.train``'s main in this pytest process, on one
    device (tests/conftest.py), as ``_train(out_dir, 1, *extra)`` would run it."""
    from medjax.cli_errors import run_cli
    from medjax.train.__main__ import main
    assert run_cli(main, _argv(out_dir, *extra)) == 0
    return _losses(out_dir)


@pytest.fixture(scope="module")
def lora_one_device(tmp_path_factory):
    """MELT's LoRA run on one device: the reference of both meshes' LoRA runs, run once."""
    return _one_device_losses(tmp_path_factory.mktemp("lora_one_device"))


def _same_losses_as_one_device(tmp_path, *extra, ref, dump=None, mesh=EP_MESH):
    ep = _train(tmp_path / "ep", 8, *mesh, *extra, dump=dump)
    assert ep.returncode == 0, ep.stderr[-3000:]
    got = _losses(tmp_path / "ep")
    assert len(ref) == len(got) == 3
    for a, b in zip(ref, got):
        assert abs(a - b) <= 1e-5, (ref, got)
    assert ref[0] != ref[-1]                  # it trained


def test_lora_on_experts_trains_like_one_device_and_moves_tokens_by_all_to_all(tmp_path, lora_one_device):
    """MELT's LoRA on every expert (+ attention): 3 steps on expert=4 × fsdp=2 equal one device
    within 1e-5; the compiled step (XLA's own dump) has all-to-alls and no all-gather whose
    replica groups span the expert axis (fsdp gathers of the embed dim remain), and its
    all-to-alls move the bytes ``python -m medjax.plan`` states."""
    _same_losses_as_one_device(tmp_path, ref=lora_one_device, dump=tmp_path / "hlo")
    dumps = sorted((tmp_path / "hlo").glob("*jit_traced*after_optimizations.txt"))
    steps = [p.read_text() for p in dumps if "all-to-all" in p.read_text()]
    assert steps, [p.name for p in dumps]
    for hlo in steps:
        assert not hlo_groups.groups_spanning(hlo, "all-gather", MESH_SHAPE, EXPERT_AXIS)
        assert hlo_groups.collectives(hlo, "all-gather")     # the fsdp gathers

    # the planner's all-to-all bytes per step (CPU: padded transport) == the rows the train
    # step's all-to-alls move off each device (the biggest dump is the train step)
    from medjax.plan import model_config, plan
    from medjax.config import load_config
    cfg = load_config([str(ROOT / "configs" / "melt_mixtral_lora.yaml")],
                      ["model=tiny", *RUN, *EP_MESH, f"train.out_dir={tmp_path / 'ep'}"])
    planned, hidden = plan(cfg, 8).moe, model_config(cfg).hidden_size
    step = max(steps, key=len)
    moved = 0
    for line in hlo_groups.collectives(step, "all-to-all"):
        if "shard_map" not in line:
            continue
        result = line.split(" all-to-all", 1)[0]
        for dims in re.findall(r"f32\[([\d,]+)\]", result):
            shape = [int(d) for d in dims.split(",")]
            moved += math.prod(shape) * 4 if shape[-1] == hidden else 0
    if cfg.model.scan_layers:        # the HLO holds ONE layer body, run once per layer by the scan
        moved *= model_config(cfg).num_layers
    ep = planned["expert_parallel"]
    assert moved > 0 and moved * (ep - 1) / ep == planned["all_to_all_padded_bytes"], (moved, planned)


def test_fsdp_without_expert_axis_runs_each_devices_own_rows(tmp_path, lora_one_device):
    """MELT's own mesh (``mesh.preset=fsdp``, no expert axis): 3 steps on fsdp=8 equal one device
    within 1e-5, and the compiled step sorts each device's routed rows only. A sort over the whole
    batch's rows is GSPMD gathering every token onto every device (what a global sort of the
    routed rows compiles to; measured on a compile-only v5p-16 MELT-Mixtral step: 8x the rows)."""
    _same_losses_as_one_device(tmp_path, ref=lora_one_device, dump=tmp_path / "hlo",
                               mesh=["mesh.preset=fsdp", "mesh.fsdp=8"])
    from medjax.plan import model_config
    from medjax.config import load_config
    cfg = load_config([str(ROOT / "configs" / "melt_mixtral_lora.yaml")], ["model=tiny", *RUN])
    rows = cfg.train.batch_size * cfg.data.seq_len * model_config(cfg).num_experts_per_tok
    step = max((p.read_text() for p in (tmp_path / "hlo").glob("*jit_traced*after_optimizations.txt")),
               key=len)
    sorted_lengths = {int(n) for n in re.findall(r"= \(?s32\[(\d+)\][^=]*? sort\(", step)}
    assert rows // 8 in sorted_lengths and rows not in sorted_lengths, (rows, sorted_lengths)


@pytest.mark.slow
def test_full_fine_tuning_trains_like_one_device(tmp_path):
    _same_losses_as_one_device(tmp_path, "lora.enabled=false",
                               ref=_one_device_losses(tmp_path / "one", "lora.enabled=false"))


@pytest.mark.multidevice
def test_expert_axis_not_dividing_the_experts_is_one_error_line(tmp_path, capsys):
    """``python -m medjax.train``'s main in this process, on the session's 8 devices."""
    from medjax.cli_errors import run_cli
    from medjax.train.__main__ import main
    status = run_cli(main, _argv(tmp_path / "bad", "mesh.preset=fsdp_ep", "mesh.fsdp=1", "mesh.expert=8"))
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if ln.strip()]
    assert status == 2 and "Traceback" not in out.err, out.err[-2000:]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and "num_experts=4" in errors[0] and "mesh.expert=8" in errors[0], errors
