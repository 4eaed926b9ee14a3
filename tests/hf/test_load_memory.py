"""Full-size loads that fit, measured: per-device peak while a checkpoint streams into an fsdp
mesh and the train state is initialised sharded; host RSS of a QLoRA nf4 load that quantizes
while streaming; the planner against both measurements. Each in both layouts: the layer loop
and the stacked layers of the layer scan (``model.scan_layers``, the run config's default),
where "one tensor in flight" means one layer's tensor."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from random_checkpoint import write_random_checkpoint

from medjax.config import load_config
from medjax.models import ModelConfig

# bf16 on disk: 104M params = 208 MB; the fp32 train state (master + AdamW mu, nu) is 1.25 GB
SHARDED = ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=24,
                      num_heads=8, num_kv_heads=4)
# bf16 on disk: 536M params = 1.07 GB (few wide layers: the adapters' jitted init compiles per layer)
QLORA = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=9,
                    num_heads=16, num_kv_heads=4)

_RSS = """
import re
def rss(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
"""

# 8 simulated devices, fsdp=8, full fine-tuning: the checkpoint loads straight into fp32
# masters on the mesh, then the AdamW moments come from a jitted init with out_shardings.
SHARDED_CHILD = _RSS + r"""
import os, sys, json, functools
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp
import medjax
from medjax import sharding
from medjax.config import MeshSection, OptimSection
from medjax.train import step as S
from medjax.train.optimizer import make_optimizer
from flax import nnx
devices = jax.devices()
base = rss("VmRSS")
mesh, rules = sharding.make_mesh(MeshSection(preset="fsdp")), sharding.rules_for("fsdp")
peak = {d: 0 for d in devices}

def live():
    held = {d: 0 for d in devices}
    for a in jax.live_arrays():
        shard = a.sharding.shard_shape(a.shape)
        for d in a.sharding.device_set:
            held[d] += int(jnp.dtype(a.dtype).itemsize * (1 if not shard else __import__("math").prod(shard)))
    return held

def sample(_path=None):
    for d, b in live().items():
        peak[d] = max(peak[d], b)

scan = sys.argv[2] == "scan"
model, _ = medjax.load(sys.argv[1], param_dtype=jnp.float32, mesh=mesh, rules=rules,
                       on_tensor=sample, progress=False, scan_layers=scan)
loaded = {"/".join(map(str, p)): str(v.get_value().sharding.spec)
          for p, v in nnx.to_flat_state(nnx.state(model)) if "up_proj" in p}
graphdef, params, rngs, frozen = S.split_model(model, lora=False)
del model
tx, _ = make_optimizer(OptimSection(), 100)
init = functools.partial(S.init_train_state, tx=tx)
state_sh = S.tree_shardings(jax.eval_shape(init, params, rngs), mesh, rules)
mem = jax.jit(init, out_shardings=state_sh, donate_argnums=(0, 1)).lower(params, rngs).compile().memory_analysis()
before = live()
state = sharding.sharded_init(init, params, rngs, out_shardings=state_sh)
extra = mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
for d in devices:   # the init's peak: what was live, plus its non-aliased outputs and temporaries
    peak[d] = max(peak[d], before[d] + extra)
sample()
leaves = jax.tree.leaves(state)
# "one tensor in flight" is one layer's tensor: a stacked leaf (under "layers") counts [L, ...] / L
per_layer = [x.nbytes // (x.shape[0] if scan and "'layers'" in jax.tree_util.keystr(k) else 1)
             for k, x in jax.tree_util.tree_leaves_with_path(state)]
mu = state.opt_state[1][0].mu
print(json.dumps({"peak_per_device": max(peak.values()), "state": sum(x.nbytes for x in leaves),
                  "largest": max(per_layer), "rss_peak": rss("VmHWM"), "base": base,
                  "loaded": loaded, "moments_sharded": [str(v.get_value().sharding.spec)
                  for p, v in nnx.to_flat_state(mu) if "up_proj" in p]}))
"""


def _child(code, *args, timeout=600):
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory):
    ckpt = write_random_checkpoint(SHARDED, tmp_path_factory.mktemp("sharded") / "ckpt")
    assert (ckpt / "model.safetensors").stat().st_size >= 200e6
    return ckpt


@pytest.mark.parametrize("layout", ["loop", "scan"])
def test_fsdp8_load_and_sharded_init_stay_within_one_share_plus_one_tensor(sharded_ckpt, layout):
    from medjax import plan as planner
    ckpt = sharded_ckpt
    r = _child(SHARDED_CHILD, ckpt, layout)
    share = r["state"] / 8
    print(f"{layout}: state {r['state'] / 2**20:.0f} MiB, largest tensor {r['largest'] / 2**20:.0f} MiB, "
          f"peak per device {r['peak_per_device'] / 2**20:.0f} MiB, process RSS over baseline "
          f"{(r['rss_peak'] - r['base']) / 2**20:.0f} MiB")
    fsdp = "P('fsdp', None)" if layout == "loop" else "P(None, 'fsdp', None)"
    assert set(r["loaded"].values()) == {fsdp}, r["loaded"]      # loaded into the run's shardings
    assert set(r["moments_sharded"]) == {fsdp}, r["moments_sharded"]
    assert r["peak_per_device"] <= share + r["largest"]
    # one process holds all 8 simulated devices, so its RSS holds 8 shares; beyond those, the
    # host keeps at most half a share plus the tensor in flight
    assert r["rss_peak"] - r["base"] <= 8 * share + 0.5 * share + r["largest"]
    cfg = load_config(None, [f"model.path={ckpt}", "mesh.preset=fsdp", "model.param_dtype=float32",
                             f"model.scan_layers={str(layout == 'scan').lower()}"])
    p = planner.plan(cfg, 8)
    assert abs(p.load_peak - r["peak_per_device"]) <= 0.1 * r["peak_per_device"], (p.load_peak, r)


# QLoRA nf4 (double quant) on one device: every decoder-layer kernel is quantized as it is read.
QLORA_CHILD = _RSS + r"""
import sys, json
import jax, jax.numpy as jnp
import medjax
from medjax.config import LoraSection
from medjax.lora import apply_lora
from medjax.quant import QuantizedLinear, quantize_model
jax.devices()
base = rss("VmRSS")
lora = LoraSection(enabled=True, rank=8, quantize="nf4", double_quant=True)

def prepare(model):
    apply_lora(model, lora)
    quantize_model(model, "nf4", block=lora.quant_block, double_quant=True)

scan = sys.argv[2] == "scan"
model, _ = medjax.load(sys.argv[1], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, prepare=prepare,
                       progress=False, scan_layers=scan)
peak = rss("VmHWM")
from flax import nnx
leaves = jax.tree.leaves(nnx.state(model))
print(json.dumps({"base": base, "rss_peak": peak, "model": sum(x.nbytes for x in leaves),
                  "quantized": isinstance((model.model.layers if scan else model.model.layers[0])
                                          .mlp.up_proj.base, QuantizedLinear)}))
"""


@pytest.fixture(scope="module")
def qlora_ckpt(tmp_path_factory):
    return write_random_checkpoint(QLORA, tmp_path_factory.mktemp("qlora") / "ckpt")


@pytest.fixture(scope="module", params=["loop", "scan"])
def qlora_load(qlora_ckpt, request):
    """One QLoRA nf4 load of a generated ~1 GB bf16 checkpoint, measured in a fresh process."""
    import numpy as np

    from random_checkpoint import hf_shapes
    ckpt, layout = qlora_ckpt, request.param
    size = (ckpt / "model.safetensors").stat().st_size
    largest_bf16 = 2 * max(int(np.prod(s)) for s in hf_shapes(QLORA).values())
    r = {**_child(QLORA_CHILD, ckpt, layout), "layout": layout}
    print(f"{layout}: checkpoint {size / 2**30:.2f} GiB bf16, nf4 model {r['model'] / 2**20:.0f} MiB, largest "
          f"bf16 tensor {largest_bf16 / 2**20:.0f} MiB, import RSS {r['base'] / 2**20:.0f} MiB, "
          f"peak RSS {r['rss_peak'] / 2**20:.0f} MiB (+{(r['rss_peak'] - r['base']) / 2**20:.0f} MiB)")
    assert size > 0.95e9 and r["quantized"]
    cfg = load_config(None, [f"model.path={ckpt}", "mesh.preset=dp", "model.dtype=bfloat16",
                             "model.param_dtype=bfloat16", "lora.enabled=true", "lora.rank=8",
                             "lora.quantize=nf4", "lora.double_quant=true",
                             f"model.scan_layers={str(layout == 'scan').lower()}"])
    from medjax import plan as planner
    return r, largest_bf16, planner.plan(cfg, 1)


@pytest.mark.slow
def test_qlora_nf4_load_host_rss_within_model_plus_two_tensors(qlora_load):
    r, largest_bf16, p = qlora_load
    assert abs(p.params - r["model"]) <= 0.01 * r["model"]         # the stored bytes: exact
    assert r["rss_peak"] <= r["model"] + 2 * largest_bf16 + r["base"]


@pytest.mark.slow
def test_planner_within_ten_percent_of_the_qlora_load(qlora_load):
    """The planner charges the stored model and the largest block in flight, not the runtime's
    own memory (compiled programs and the compiler's transients). In the loop layout, the
    ``medjax.load`` default the issue measures, that lands within 10%. The stacked layout
    compiles a create-and-write program per stacked weight while nearly all of the model is
    already allocated (measured 2026-11-30: -9% to -12% on this shape; on CPU the devices are the
    host, so compiler and model share one RSS), so it is held to 15%."""
    r, _, p = qlora_load
    used = r["rss_peak"] - r["base"]
    print(f"{r['layout']}: planner: params {p.params / 2**20:.0f} MiB + in flight "
          f"{p.host_load / 2**20:.0f} MiB vs {used / 2**20:.0f} MiB used "
          f"({(p.params + p.host_load) / used - 1:+.1%})")
    tolerance = 0.10 if r["layout"] == "loop" else 0.15
    assert abs(p.params + p.host_load - used) <= tolerance * used
