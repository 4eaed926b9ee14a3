"""``python -m medjax.plan --compile``: the real train step compiled for compile-only TPU / GPU
devices from this CPU (medjax/plan/compile.py).

The compiles run in the extra venvs (``make tpu-venv`` / ``make cuda-venv``; libtpu and the
CUDA plugin never go into .venv) as subprocesses; without the venv the test skips and says so.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medjax.cli_errors import run_cli
from medjax.plan.__main__ import main as plan_main

ROOT = Path(__file__).resolve().parents[1]
TPU_PY = ROOT / ".venv-tpu" / "bin" / "python"
CUDA_PY = ROOT / ".venv-cuda" / "bin" / "python"
H100_SPEC = ROOT.parent / "shared" / "data" / "gpu_specs" / "h100_sxm.txtpb"
ENV = dict(os.environ, TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def _run(python, *args, timeout=900):
    return subprocess.run([str(python), *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_tiny_train_step_compiles_for_v5e_2x2_with_fsdp_and_mosaic_kernels(scan):
    """The LoRA recipe's real train step (tiny Llama, fsdp over 4 v5e chips, 2 micro-batches,
    the recipe's full remat) compiled by libtpu: the attention is Mosaic (forward, its remat
    recomputation, dQ, dK/dV: per layer in the loop, once in the scanned layer body), the memory
    is XLA's,
    and the planner's exact part (params + optimizer state) equals the bytes the step's input
    shardings hold. ``--device-memory`` below the compiled total gives the one-line error."""
    if not TPU_PY.exists():
        pytest.skip(f"no {TPU_PY.parent.parent.name}: `make tpu-venv` installs the TPU compiler")
    res = _run(TPU_PY, "-m", "medjax.plan", "--config", "configs/melt_llama2_lora.yaml",
               "model.preset=tiny-llama2", "mesh.preset=fsdp", "data.seq_len=256",
               "train.batch_size=8", "train.grad_accum=2", f"model.scan_layers={str(scan).lower()}",
               "--device", "v5e-4", "--compile", "--device-memory", "1MiB")
    out = res.stdout
    assert "4 × TPU v5e" in out and "fsdp=4" in out, res.stdout + res.stderr[-3000:]
    # libtpu is told it only compiles (tpu_compile.LIBTPU_HOST_ENV; ENV above sets none of it):
    # no "could not determine TPU accelerator type" WARNING, no E0000 line, no source trace
    noise = [ln for ln in res.stderr.splitlines()
             if re.search(r"WARNING|^E\d{4} |Source Location Trace", ln)]
    assert not noise, res.stderr[-3000:]
    bodies = 1 if scan else 2                                      # tiny-llama2: 2 layers
    assert f"{4 * bodies} Mosaic, 0 Triton, 0 cuDNN" in out, out
    b = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out.split("bytes per device:")[1])}
    # on TPU the total is libtpu's peak (arguments + its temp block), not arguments + temp_size
    assert b["peak"] >= b["argument"] and b["total"] == b["peak"], b
    assert b["total"] <= b["argument"] + b["output"] - b["alias"] + b["temp"], b
    assert b["temp"] > 0 and 0 < b["alias"] <= min(b["output"], b["argument"])  # state donated
    batch = 8 * 256 * 4 * 5 // 4                                    # 5 int32/fp32 [B,T] per device
    state = b["planner_params"] + b["planner_optimizer"]
    assert abs(b["sharded_arguments"] - batch - state) < 1024, b  # step counter, RNG keys
    assert b["argument"] >= b["sharded_arguments"]                 # + TPU tile padding
    assert re.search(r"FLOPs per step per device: compiled \d", out)
    assert "est. step time >=" in out and "lower bound" in out
    # does not fit in 1 MiB: exit 2, one error line naming device, bytes needed and available
    assert res.returncode == 2
    errors = _error_lines(res.stderr)
    assert len(errors) == 1 and "does not fit" in errors[0], res.stderr[-2000:]
    assert f"needs {b['total']:,} bytes" in errors[0] and "1,048,576 bytes" in errors[0]


@pytest.mark.slow
def test_step_libtpu_cannot_fit_is_one_error_line():
    """32k rows of 512 tokens on 4 v5e chips: libtpu itself refuses (HBM), one line, exit 2."""
    if not TPU_PY.exists():
        pytest.skip(f"no {TPU_PY.parent.parent.name}: `make tpu-venv` installs the TPU compiler")
    res = _run(TPU_PY, "-m", "medjax.plan", "--config", "configs/melt_llama2_lora.yaml",
               "model.preset=tiny-llama2", "mesh.preset=fsdp", "data.seq_len=512",
               "train.batch_size=32768", "train.grad_accum=1", "--device", "v5e-4", "--compile")
    errors = _error_lines(res.stderr)
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert re.search(r"v5e x4: does not fit: needs [0-9.]+G per device, 15.75G HBM available",
                     errors[0]), errors[0]


@pytest.mark.slow
def test_cudnn_is_dispatched_when_compiled_for_a_deviceless_h100():
    if not CUDA_PY.exists():
        pytest.skip(f"no {CUDA_PY.parent.parent.name}: `make cuda-venv` installs the CUDA "
                    f"compiler (optional, ~5.5 GB)")
    res = _run(CUDA_PY, "tests/compile_only/cudnn_dispatch_check.py")
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    layers = 2
    # the model's causal call: cuDNN flash attention in every layer, no other kernel
    assert got["causal"] == {"mosaic": 0, "triton": 0, "cudnn": layers}
    # training's call (positions + segment ids, unknown until run time): cuDNN for right
    # padding and the Triton kernel for packed rows, both in the program
    assert got["training"] == {"mosaic": 0, "triton": layers, "cudnn": layers}


@pytest.mark.parametrize("device, extra, message", [
    (["--device", "v5p-6"], [], "v5p with 3 chips: unknown topology"),
    (["--device", "h100", "--num-devices", "16"], [], "unknown topology"),
    (["--device", "a100"], [], "a100: unknown chip"),
    ([], [], "--compile needs --device"),
])
def test_bad_device_is_one_error_line(capsys, device, extra, message):
    rc = run_cli(plan_main, ["--config", "configs/melt_llama2_lora.yaml", *device, "--compile", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert message in err[0]


@pytest.mark.parametrize("device, package", [("v5p-8", "libtpu"), ("h100", "jax_cuda12_plugin")])
def test_missing_extra_names_the_package(device, package):
    """In .venv (no libtpu, no CUDA plugin, by design) the compile asks for the extra."""
    res = _run(sys.executable, "-m", "medjax.plan", "--config", "configs/melt_llama2_lora.yaml",
               "--device", device, "--compile", timeout=300)
    errors = _error_lines(res.stderr)
    if package == "libtpu" and "libtpu" in sys.modules or not errors and res.returncode == 0:
        pytest.skip("this venv has the extra installed")
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert package in errors[0] and f"make {'tpu' if package == 'libtpu' else 'cuda'}-venv" in errors[0]


def test_gpu_target_config_matches_xla_h100_spec():
    """The H100 description compiled against is XLA's published H100 SXM spec."""
    if not H100_SPEC.exists():
        pytest.skip(f"{H100_SPEC} not present")
    from medjax.ops.hardware import CHIPS
    from medjax.plan.compile import gpu_target_config
    fields = lambda text: dict(re.findall(r'(\w+): ("[^"]*"|[^\s}]+)', text))  # noqa: E731
    ours, xla = fields(gpu_target_config(CHIPS["h100"])), fields(H100_SPEC.read_text())
    assert ours == xla


def test_cpu_compile_adds_the_host_process_to_the_compiled_step(capsys):
    """``--device cpu --compile``: the step compiled for this host; its total is the compiler's
    arguments + outputs - aliased + temporaries plus this process's runtime and compiler RSS.
    Pipelined (stage 4 x data 2 on 8 host devices, M = 8): the step is compiled again at M = 4,
    and the FLOPs per step are the part outside the loops plus the iterations x the stage's
    layers x one layer's body, both parts from the two counts (``_pipeline_rows``)."""
    assert plan_main(["--config", "configs/meditron_llama2_cpt.yaml", "model=tiny",
                      "model.preset=tiny-llama2-8l", "mesh.stage=4", "mesh.data=2",
                      "train.grad_accum=8", "train.batch_size=16", "--device", "cpu",
                      "--num-devices", "8", "--compile"]) == 0
    out = capsys.readouterr().out
    assert "8 × host CPU" in out and "host RAM" in out and "est. step time" not in out
    assert "bubble (S-1)/(R*M+S-1) = 27.3% at M=8 (2*S), 15.8% at M=16 (4*S)" in out, out
    rows = re.findall(r"M=(\d+) +bubble ([\d.]+)%: compiled ([\d.e+]+) = ([\d.e+]+) \+ (\d+) x 2 x "
                      r"([\d.e+]+) -> ([\d.]+)x model .*counted ([\d.e+]+)", out)
    assert [(r[0], r[1], r[4]) for r in rows] == [("8", "27.3", "11"), ("4", "42.9", "7")], out
    (_, _, f8, o, _, b8, x8, c8), (_, _, f4, _, _, b4, x4, c4) = [[float(v) for v in r] for r in rows]
    assert b4 == pytest.approx(2 * b8, rel=1e-3)               # a micro-batch of twice the rows
    assert o + b8 == pytest.approx(c8, rel=1e-3) and o + b4 == pytest.approx(c4, rel=1e-3)
    assert f8 == pytest.approx(o + 11 * 2 * b8, rel=1e-3) and x4 > x8 > 1
    b = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out.split("bytes per device:")[1])}
    host = float(re.search(r"host process\s+([0-9.]+)", out).group(1)) * 2**30
    # this process's high-water mark: in a pytest worker it includes the tests run before this one
    # (`python -m medjax.plan` is a fresh process), so the bound is the worker's own, read after
    import resource
    assert 0.1 * 2**30 < host <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + 0.01 * 2**30
    compiled = b["argument"] + b["output"] - b["alias"] + b["temp"]
    assert abs(b["total"] - compiled - host) < 0.01 * 2**30


def test_cpu_compile_more_devices_than_the_process_has_is_one_error_line(capsys):
    rc = run_cli(plan_main, ["--config", "configs/melt_llama2_lora.yaml", "model=tiny", "--device",
                             "cpu", "--num-devices", "64", "--compile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "this process has 8 CPU devices" in err[0], err


def test_cpu_plan_charges_the_fp32_dot_operands_the_cpu_compiler_makes(tmp_path, capsys):
    """XLA:CPU has no bf16 dot: a bf16 step's temporaries are fp32 copies of one layer's weights
    and the head. ``plan --device cpu`` (no compile) charges them; the compiler agrees within 15%
    on a 1024-wide, 32000-vocab, 2-layer Llama (and without the term the planner is 10x under)."""
    import dataclasses
    import json as _json

    from medjax.config import load_config
    from medjax.models import get_preset
    from medjax.plan import plan
    cfg_model = dataclasses.replace(get_preset("llama2-7b"), num_layers=2, hidden_size=1024,
                                    intermediate_size=2816, num_heads=8, num_kv_heads=8, head_dim=128)
    (tmp_path / "config.json").write_text(_json.dumps(cfg_model.to_hf_config("bfloat16")))
    overrides = [f"model.path={tmp_path}", "model.preset=null", "data.seq_len=64",
                 "train.batch_size=1", "train.grad_accum=1"]
    assert plan_main(["--config", "configs/melt_llama2_lora.yaml", *overrides, "--device", "cpu",
                      "--compile"]) == 0
    out = capsys.readouterr().out
    compiled_temp = int(re.search(r"temp=(\d+)", out).group(1))
    p = plan(load_config(["configs/melt_llama2_lora.yaml"], overrides), 1, host_cpu=True)
    planned = p.cpu_dot_operands + p.activations + p.temporaries
    assert abs(planned / compiled_temp - 1) < 0.15, (planned, compiled_temp)
    assert p.activations + p.temporaries < compiled_temp / 10
    assert p.runtime > 0 and p.total > p.params + p.cpu_dot_operands
