"""The product path in 2 processes equals 1 process: ``launch/local_multiprocess.sh -n 2 -d D --
python -m medjax.train ...`` against one process on 2·D simulated devices (the 1-process reference
runs ``medjax.train``'s ``main`` in the pytest process, on 2·D of the session's 8 devices, where
the test's point is not the launch itself). D = 2 unless the layout needs more (the pipeline's
2 stages × fsdp 4): gloo's cross-process all-reduce is ~3x cheaper at 2 x 2 than at 2 x 4.

Every process builds the same global batch stream and keeps its block of rows of each batch
(``make_dataset``), so the batch, the tokens per step, the loss up to summation order and the
LoRA dropout masks (drawn by global row; the recipe's ``lora.dropout=0.05`` is on) are the same,
packed or not: every recipe in configs/ is checked at tiny size.

Also here: the Med42 DPO recipe, a real SIGKILL of both processes mid-run, ``python -m
medjax.export`` and eval during training in 2 processes, and the two layout errors (a batch the
mesh cannot split; processes started with different configs).
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
SFT = ("--config", str(ROOT / "configs" / "melt_llama2_lora.yaml"), "model=tiny", "mesh.preset=fsdp",
       "data.pack=false", "data.long_examples=truncate", "lora.dropout=0.05", "train.steps=4",
       "train.export=[]", "eval.tasks=[]", "checkpoint.every=2")
# Med42 stage 2 (full fine-tune, frozen-copy reference); 16 pairs in 2 micro-batches of 8. At
# seq_len 256 a quarter of the tiny pairs' sides are truncated and every side keeps response
# tokens (longest chat-rendered prompt: 214 bytes; the recipe's tiny default 448 truncates none).
DPO = ("--config", str(ROOT / "configs" / "med42_dpo.yaml"), "model=tiny", "mesh.preset=fsdp",
       "data.seq_len=256", "data.long_examples=truncate", "train.batch_size=16", "train.grad_accum=2", "train.steps=4",
       "train.export=[]", "eval.tasks=[]", "checkpoint.every=2")


def _env(devices=None):
    """The subprocess environment; ``devices``: the forced CPU device count, appended to the
    session's XLA_FLAGS (tests/conftest.py). None where the launcher sets it (``-d``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    if devices is not None:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return env


def _command(module, args, processes=1, devices=8):
    cmd = [sys.executable, "-m", module, *args]
    if processes > 1:
        cmd = [str(ROOT / "launch" / "local_multiprocess.sh"), "-n", str(processes), "-d", str(devices),
               "--", *cmd]
    return cmd


def _module(module, *args, processes=1, devices=8):
    """``python -m module args`` in one process, or in ``processes`` under the local launcher."""
    return subprocess.run(_command(module, args, processes, devices), cwd=ROOT,
                          env=_env(devices if processes == 1 else None), capture_output=True, text=True,
                          timeout=900)


def _train(out_dir, *extra, processes=1, resume=False, recipe=SFT, devices=None):
    """``devices``: per process (default 8 in one process, 4 in several). Tests that compare two
    2-process runs use 2 x 2: gloo's cross-process all-reduce costs 1.8 ms at 2 x 1 devices and
    5.4 ms at 2 x 4 on this 2-core machine, and a tiny step runs dozens of them."""
    args = ["--no-progress", *(["--resume"] if resume else []), *recipe, f"train.out_dir={out_dir}", *extra]
    return _module("medjax.train", *args, processes=processes,
                   devices=devices or (8 if processes == 1 else 4))


def _train_here(out_dir, *extra, recipe=SFT):
    """The 1-process reference: ``python -m medjax.train``'s ``main`` in this pytest process on
    the session's 8 devices (the test is marked ``multidevice``), as the subprocess would run it."""
    from medjax.cli_errors import run_cli
    from medjax.train.__main__ import main
    assert run_cli(main, ["--no-progress", *recipe, f"train.out_dir={out_dir}", *extra]) == 0


def _ok(proc):
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def _losses(run_dir, key="loss"):
    from medjax.train.metrics import read_metrics
    return {r["step"]: r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"}


def _assert_close(ref, got):
    assert sorted(ref) == sorted(got) and sorted(ref) == list(range(1, len(ref) + 1))
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-5 * max(1.0, abs(ref[s])), (s, ref[s], got[s])


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_train_like_one(tmp_path, mesh_devices):
    """One epoch of 33 training rows and 9 held-out rows: the last global batch of each holds one
    row (the others are padding), in 2 processes x 2 devices as in 1 x 4; both run the same 5
    steps and 2 held-out batches."""
    import json
    uneven = ("data.max_rows=33", "data.heldout_rows=9", "train.epochs=1")
    by_epochs = tuple(a for a in SFT if not a.startswith("train.steps="))   # both given: an error
    with mesh_devices.use(4):
        _train_here(tmp_path / "one", *uneven, recipe=by_epochs)
    _ok(_train(tmp_path / "two", *uneven, processes=2, devices=2, recipe=by_epochs))
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(ref) == sorted(got) == list(range(1, 6))
    _assert_close(ref, got)
    assert _losses(tmp_path / "one", "tokens") == _losses(tmp_path / "two", "tokens")
    for key in ("heldout_loss_before", "heldout_loss_after"):
        one, two = (json.loads((tmp_path / n / "summary.json").read_text())[key] for n in ("one", "two"))
        assert abs(one - two) <= 1e-5 * max(1.0, abs(one)), (key, one, two)


@pytest.mark.slow
@pytest.mark.multidevice
def test_pipeline_stages_spanning_two_processes_train_like_one(tmp_path):
    """``mesh.stage=2`` over 2 processes × 4 devices (stage s = process s's devices; each process
    loads every row, ``sharding.data_blocks``) against 1 × 8: the losses, loss tokens and
    held-out losses of 4 steps (MELT LoRA, 4 micro-batches) agree to 1e-5."""
    import json
    stages = ("mesh.stage=2", "mesh.fsdp=4", "lora.dropout=0", "train.batch_size=16",
              "train.grad_accum=4", "data.heldout_rows=8")
    _train_here(tmp_path / "one", *stages)
    _ok(_train(tmp_path / "two", *stages, processes=2))
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(ref) == list(range(1, 5))
    _assert_close(ref, got)
    assert _losses(tmp_path / "one", "tokens") == _losses(tmp_path / "two", "tokens")
    for key in ("heldout_loss_before", "heldout_loss_after"):
        one, two = (json.loads((tmp_path / n / "summary.json").read_text())[key] for n in ("one", "two"))
        assert abs(one - two) <= 1e-5 * max(1.0, abs(one)), (key, one, two)


@pytest.mark.slow
def test_a_batch_the_mesh_cannot_split_stops_every_process_with_one_error(tmp_path):
    bad = _train(tmp_path / "bad", "train.batch_size=12", "train.grad_accum=1", processes=2)
    assert bad.returncode == 2, (bad.stdout + bad.stderr)[-3000:]
    errors = [line for line in (bad.stdout + bad.stderr).splitlines() if "error:" in line]
    assert errors and all("batch size 12" in line for line in errors), errors


@pytest.mark.slow
def test_dpo_two_processes_resume_exactly(tmp_path):
    """Med42's DPO stage (full fine-tune against a frozen copy, 2 accumulated micro-batches) in 2
    processes, stopped after the step-2 checkpoint and resumed: steps 3-4 repeat exactly (2
    processes = 1 for this recipe: test_multihost_recipes.py)."""
    import shutil
    _ok(_train(tmp_path / "two", recipe=DPO, processes=2, devices=2))
    got = _losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3, 4]
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "4")
    _ok(_train(tmp_path / "two", recipe=DPO, processes=2, devices=2, resume=True))
    again = _losses(tmp_path / "two")
    assert [again[s] for s in (3, 4)] == [got[s] for s in (3, 4)]


def _tensors(directory):
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_two_processes_export_and_eval_like_one(tmp_path, benchmarks_dir):
    """A 2-process LoRA run exports (in the run, and by ``python -m medjax.export`` in 2 processes)
    what a 1-process export of its checkpoint on another mesh writes; ``python -m medjax.eval`` of
    the run checkpoint scores alike in 2 processes and in 1; eval during training writes its result
    once. Only process 0 writes: no temporary files are left beside the outputs."""
    import json

    import numpy as np
    run = tmp_path / "run"
    _ok(_train(run, "train.steps=2", "train.export=[hf,peft]", "eval.tasks=[medqa_4options]",
               "eval.limit=4", f"eval.data_dir={benchmarks_dir}", processes=2, devices=2))
    assert json.loads((run / "eval.json").read_text())["results"]["medqa_4options"]["n"] == 4
    ckpt = str(run / "checkpoints")
    two = _ok(_module("medjax.export", "--checkpoint", ckpt, "--out", str(tmp_path / "peft2"), "--peft",
                      processes=2, devices=2))
    assert two.stdout.count("exported step") == 1 and "[p0] exported step" in two.stdout, two.stdout  # p0 alone
    # the 1-process references: the CLIs' mains in this pytest process, on one device
    from medjax.cli_errors import run_cli
    from medjax.eval.__main__ import main as eval_main
    from medjax.export.__main__ import main as export_main
    assert run_cli(export_main, ["--checkpoint", ckpt, "--out", str(tmp_path / "peft1"), "--peft",
                                 "mesh.preset=dp"]) == 0
    assert run_cli(export_main, ["--checkpoint", ckpt, "--out", str(tmp_path / "hf1"), "mesh.preset=dp"]) == 0
    evaluate = ("--model", ckpt, "--data-dir", str(benchmarks_dir), "--tasks", "medmcqa", "--limit", "4",
                "--log-samples", "--output")
    _ok(_module("medjax.eval", *evaluate, str(tmp_path / "eval2.json"), processes=2, devices=2))  # fsdp
    assert run_cli(eval_main, [*evaluate, str(tmp_path / "eval1.json"), "mesh.preset=dp"]) == 0
    one, two = (json.loads((tmp_path / f"eval{n}.json").read_text())["samples"]["medmcqa"] for n in (1, 2))
    for a, b in zip(one, two, strict=True):
        assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=1e-5, rel=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval1.json", "eval2.json", "hf1", "peft1", "peft2", "run"]
    assert sorted(p.name for p in (run / "export").iterdir()) == ["hf", "peft"]
    ref = _tensors(tmp_path / "peft1")
    assert len(ref) == 2 * 7 * 2          # lora_A/B on q,k,v,o,gate,up,down of 2 layers
    for other in (tmp_path / "peft2", run / "export" / "peft"):
        got = _tensors(other)
        assert sorted(got) == sorted(ref)
        for name in ref:
            np.testing.assert_array_equal(got[name], ref[name], err_msg=f"{other}: {name}")
        assert (other / "adapter_config.json").read_text() == (tmp_path / "peft1" / "adapter_config.json").read_text()
    ref, got = _tensors(tmp_path / "hf1"), _tensors(run / "export" / "hf")
    assert sorted(got) == sorted(ref)
    for name in ref:      # merged W + s·A·B, computed on the fsdp mesh vs one device
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_sigkill_both_processes_then_resume_continues_identically(tmp_path):
    """A real kill: both processes (and the launcher) SIGKILLed once the step-2 checkpoint is on
    disk, mid-run (a later checkpoint may be half written); ``--resume`` in both continues from
    the newest complete checkpoint (each host restores its own data iterator position) and every
    step's loss equals the uninterrupted run's."""
    steps = ("train.steps=4", "checkpoint.every=2")   # killed after step 2: steps 3-4 resumed
    _ok(_train(tmp_path / "ref", *steps, processes=2, devices=2))
    run = tmp_path / "killed"
    cmd = _command("medjax.train", ["--no-progress", *SFT, f"train.out_dir={run}", *steps], 2, 2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (run / "checkpoints" / "2").is_dir():    # orbax renames a finished step into place
            assert proc.poll() is None, "the run ended before its step-2 checkpoint"
            assert time.monotonic() < deadline, "no step-2 checkpoint after 600 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert max(_losses(run)) < 4, "killed after the run had finished: nothing was interrupted"
    _ok(_train(run, *steps, processes=2, devices=2, resume=True))
    ref, got = _losses(tmp_path / "ref"), _losses(run)
    assert sorted(got) == sorted(ref) == list(range(1, 5))
    assert [got[s] for s in ref] == [ref[s] for s in ref]


@pytest.mark.slow
def test_processes_started_with_different_configs_stop_with_one_error(tmp_path):
    """Process 1 gets another ``optim.lr``: both stop with one ``error:`` line, exit 2, before any
    output is made, and neither waits forever at a barrier."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    try:
        for i, lr in enumerate(("0.002", "0.003")):
            env = dict(_env(4), MEDJAX_COORDINATOR=f"127.0.0.1:{port}", MEDJAX_NUM_PROCESSES="2",
                       MEDJAX_PROCESS_ID=str(i))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "medjax.train", "--no-progress", *SFT,
                 f"train.out_dir={tmp_path / 'bad'}", f"optim.lr={lr}"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        errors = [line for line in (out + err).splitlines() if "error:" in line]
        assert p.returncode == 2 and len(errors) == 1, (out + err)[-3000:]
        assert errors[0].startswith("error: processes [1] were started with a different config")
    assert not (tmp_path / "bad").exists()
