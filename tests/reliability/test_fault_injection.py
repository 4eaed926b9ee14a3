"""SIGKILL ``python -m medjax.train`` at seeded points; every resume must continue exactly.

Two chains of seven kills each (14 trials). A chain is one training run that is killed, resumed
with ``--resume``, killed again at a later point, ... and finally resumed to completion. Kill points
(see fault_runner.py): while a step is in flight, during an asynchronous checkpoint save, while the
HF export writes its safetensors, and with the export written but not yet renamed into place.

After every kill the next process must
* start from the newest step directory on disk (so that directory was complete: orbax writes
  in-progress saves under a temporary name) without any "unreadable checkpoint" fallback,
* log, for every step, exactly the loss the uninterrupted reference run logged for that step,
and the export directory must never exist unless it is complete and equal to the reference export.
"""
import numpy as np
import pytest
from safetensors.numpy import load_file

from reliability_helpers import (FIGURES, checkpoint_steps, n_lines, run_faulted, tiny_run_config,
                                 train_records, write_config)

STEPS, EVERY = 12, 2
N_CHAINS, KILLS_PER_CHAIN = 2, 7      # seed 20261121: 6 step, 4 ckpt, 2 + 2 export kills
SEED = 20261121


def plan_chain(rng) -> list[tuple[str, int, float]]:
    """Five kills during training at increasing steps, then two during the export."""
    kills = []
    for s in sorted(rng.choice(np.arange(1, STEPS + 1), size=KILLS_PER_CHAIN - 2, replace=False)):
        if (s % EVERY == 0 or s == STEPS) and rng.random() < 0.6:
            kills.append(("ckpt", int(s), float(rng.uniform(0, 400))))
        else:
            kills.append(("step", int(s), float(rng.uniform(0, 50))))
    exports = [("export_write", 0, 0.0), ("export_rename", 0, 0.0)]
    rng.shuffle(exports)
    return kills + exports


def _export_problem(export_dir, ref_tensors) -> str | None:
    """None if ``export_dir`` is absent or a complete copy of the reference export."""
    if not export_dir.exists():
        return None
    if not (export_dir / "config.json").is_file() or not (export_dir / "model.safetensors").is_file():
        return f"{export_dir} exists but is incomplete: {sorted(p.name for p in export_dir.iterdir())}"
    try:
        got = load_file(str(export_dir / "model.safetensors"))
    except Exception as e:  # noqa: BLE001
        return f"{export_dir}/model.safetensors unreadable: {e}"
    if set(got) != set(ref_tensors) or any(not np.array_equal(got[k], ref_tensors[k]) for k in got):
        return f"{export_dir} differs from the reference export"
    return None


def _tail(proc) -> str:
    return (proc.stdout[-1500:] + "\n--- stderr ---\n" + proc.stderr[-3000:])


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_exactly(rel_model_dir, rel_text_data, jax_cache, tmp_path):
    ref_dir = tmp_path / "reference"
    ref_cfg = write_config(tmp_path / "reference.yaml",
                           tiny_run_config(rel_model_dir, rel_text_data, ref_dir, steps=STEPS, every=EVERY))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = set(tmp_path.rglob("*"))
    proc = run_faulted(ref_cfg, "none", 0, 0, cache_dir=jax_cache, resume=False, cwd=cwd)
    assert proc.returncode == 0, _tail(proc)
    # every file the run wrote lies under its declared root (train.out_dir); none in the cwd
    strays = [p for p in set(tmp_path.rglob("*")) - before if p != ref_dir and ref_dir not in p.parents]
    assert not strays, strays
    ref_loss = {r["step"]: r["loss"] for r in train_records(ref_dir / "metrics.jsonl")}
    assert sorted(ref_loss) == list(range(1, STEPS + 1))
    ref_tensors = load_file(str(ref_dir / "export" / "hf" / "model.safetensors"))

    rng = np.random.default_rng(SEED)
    injected, survived, failures = 0, 0, []
    for chain in range(N_CHAINS):
        run_dir = tmp_path / f"chain{chain}"
        cfg = write_config(tmp_path / f"chain{chain}.yaml",
                           tiny_run_config(rel_model_dir, rel_text_data, run_dir, steps=STEPS, every=EVERY))
        metrics, ckpts = run_dir / "metrics.jsonl", run_dir / "checkpoints"
        plan = plan_chain(rng) + [("none", 0, 0.0)]
        for i, (kind, step, delay) in enumerate(plan):
            on_disk = checkpoint_steps(ckpts)
            first_line = n_lines(metrics)
            proc = run_faulted(cfg, kind, step, delay, cache_dir=jax_cache, resume=i > 0)
            what = f"chain {chain} process {i} ({kind} {step} {delay:.0f}ms)"
            problems = []
            if kind == "none":
                if proc.returncode != 0:
                    problems.append(f"final resume failed rc={proc.returncode}")
            else:
                injected += 1
                if proc.returncode != -9:
                    problems.append(f"expected SIGKILL, got rc={proc.returncode}")
            # this process resumed after the previous kill: check where it started
            new = train_records(metrics, first_line)
            if i > 0 and new and new[0]["step"] != (on_disk[-1] + 1 if on_disk else 1):
                problems.append(f"resumed at step {new[0]['step']} but newest checkpoint on disk "
                                f"was {on_disk}")
            if "unreadable" in proc.stderr:
                problems.append("a listed checkpoint was unreadable (partial save taken as complete)")
            bad = [r["step"] for r in new if r["loss"] != ref_loss[r["step"]]]
            if bad:
                problems.append(f"losses differ from the uninterrupted run at steps {bad}")
            export_problem = _export_problem(run_dir / "export" / "hf", ref_tensors)
            if export_problem:
                problems.append(export_problem)
            if problems:
                failures.append(f"{what}: {'; '.join(problems)}\n{_tail(proc)}")
            elif i > 0:
                survived += 1          # the previous kill was survived: resume verified
        final = {r["step"]: r["loss"] for r in train_records(metrics)}
        if final != ref_loss:
            failures.append(f"chain {chain}: final loss sequence differs from the reference")
        if _export_problem(run_dir / "export" / "hf", ref_tensors) or not (run_dir / "export" / "hf").exists():
            failures.append(f"chain {chain}: final export missing or different")
    FIGURES["faults_injected"] += injected
    FIGURES["faults_survived"] += survived
    print(f"\nSIGKILL trials: {survived} survived / {injected} injected")
    assert not failures, "\n\n".join(failures)
    assert injected == N_CHAINS * KILLS_PER_CHAIN == survived
