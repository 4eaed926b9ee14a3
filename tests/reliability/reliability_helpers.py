"""Shared pieces of the reliability suites: a tiny run config, subprocess runs, metrics reading."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

FACTS = ["aspirin is an antiplatelet drug.", "insulin is a pancreatic hormone.",
         "the femur is the thigh bone.", "asthma is an airway disease.",
         "the liver is an abdominal organ.", "ibuprofen is an NSAID.",
         "the heart is a muscular pump.", "anaemia is low haemoglobin."]


def write_text_data(path: Path, n: int = 40) -> Path:
    """Short ``text`` rows: with the byte tokenizer they fit in seq 32."""
    path.write_text("".join(json.dumps({"text": f"{FACTS[i % 8]} ({i})"}) + "\n" for i in range(n)))
    return path


def tiny_run_config(model_dir, data, out_dir, *, steps=12, every=2, async_save=True,
                    export=("hf",), **sections) -> dict:
    cfg = {
        "model": {"path": str(model_dir), "dtype": "float32", "param_dtype": "float32",
                  "attention": "xla"},
        "data": {"train": str(data), "format": "text", "seq_len": 32, "seed": 0, "heldout_rows": 8},
        "optim": {"lr": 1e-2, "schedule": "constant", "warmup_steps": 0, "clip_norm": 1.0},
        "lora": {"enabled": False},
        "checkpoint": {"every": every, "keep": 3, "async_save": async_save},
        "train": {"steps": steps, "batch_size": 4, "out_dir": str(out_dir), "export": list(export)},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(cache_dir: Path) -> dict:
    """Subprocess environment: the JAX persistent compilation cache makes every restart cheap."""
    e = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return e


def run_faulted(config: Path, kind: str, step: int, delay_ms: float, *, cache_dir: Path,
                resume: bool, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(HERE / "fault_runner.py"), kind, str(step), str(delay_ms), "--",
           "--config", str(config), "--no-progress"] + (["--resume"] if resume else [])
    return subprocess.run(cmd, capture_output=True, text=True, env=env(cache_dir), timeout=timeout,
                          cwd=str(cwd))


def train_records(metrics_path: Path, start_line: int = 0) -> list[dict]:
    """Every ``train`` record of metrics.jsonl from ``start_line`` on (duplicates kept, file order)."""
    if not metrics_path.exists():
        return []
    lines = metrics_path.read_text().splitlines()[start_line:]
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == "train"]


def n_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Step directories a restore would consider (orbax keeps in-progress saves under tmp names)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


# Counts the suites report at the end of the pytest run (see conftest.pytest_terminal_summary).
FIGURES = {"faults_injected": 0, "faults_survived": 0, "bad_inputs_tried": 0, "bad_inputs_clean": 0}
