"""Run ``python -m medjax.train`` with one fault injected: the process SIGKILLs itself at a chosen point.

    python fault_runner.py KIND STEP DELAY_MS -- [medjax.train arguments]

KIND (where the kill lands):
  step           while optimizer step STEP is in flight (dispatched, result not fetched), after DELAY_MS
  ckpt           DELAY_MS after the checkpoint save of step STEP began (its synchronous copy or the
                 asynchronous commit running in the background, depending on the delay)
  export_write   in the HF export, after half of the safetensors shard's bytes are on disk
  export_rename  in the HF export, with every file written but the temp directory not yet renamed
  none           no fault (a plain run)

The hooks wrap medjax functions from outside (monkeypatching); the product code is unchanged.
If the run finishes without reaching the fault point the runner exits with status 99.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(kind: str, step: int, delay_s: float) -> None:
    if kind == "step":
        from medjax.train import step as S
        real_jit = S.jit_train_step

        def jit_train_step(*args, **kwargs):
            fn, shardings = real_jit(*args, **kwargs)

            def step_fn(state, *rest):
                if int(state.step) == step - 1:
                    fn(state, *rest)                  # dispatched asynchronously: in flight
                    time.sleep(delay_s)
                    _die()
                return fn(state, *rest)
            return step_fn, shardings
        S.jit_train_step = jit_train_step
    elif kind == "ckpt":
        from medjax.train.checkpoint import Checkpointer
        real_save = Checkpointer.save

        def save(self, at_step, state, meta):
            if at_step != step:
                return real_save(self, at_step, state, meta)
            threading.Timer(delay_s, _die).start()
            result = real_save(self, at_step, state, meta)
            # hold the training thread until the kill lands, so it lands in THIS save (sync copy or
            # background commit) even when later steps would otherwise run faster than the delay
            time.sleep(delay_s + 30)
            return result
        Checkpointer.save = save
    elif kind == "export_write":
        import medjax.hf.export as E
        real_write = E.write_safetensors

        def write_safetensors(filename, tensors, metadata=None):
            real_write(filename, tensors, metadata)
            size = os.path.getsize(filename)
            os.truncate(filename, size // 2)
            _die()
        E.write_safetensors = write_safetensors
    elif kind == "export_rename":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if ".tmp-" in os.fspath(src) and Path(os.fspath(dst)).name == "hf":
                _die()
            return real_replace(src, dst, *args, **kwargs)
        os.replace = replace
    elif kind != "none":
        raise SystemExit(f"unknown fault kind {kind!r}")


def main() -> int:
    sep = sys.argv.index("--")
    kind, step, delay_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    install(kind, step, delay_ms / 1000.0)
    from medjax.cli_errors import run_cli
    from medjax.train.__main__ import main as train_main
    status = run_cli(train_main, sys.argv[sep + 1:])
    return 99 if kind != "none" and status == 0 else status


if __name__ == "__main__":
    sys.exit(main())
