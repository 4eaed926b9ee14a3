"""medjax.plan: shapes from jax.eval_shape, per-device bytes by the sharding rules."""
from __future__ import annotations

import math

import jax
import pytest
from flax import nnx

from medjax import plan as planner
from medjax.plan.__main__ import main as plan_main
from medjax.cli_errors import run_cli
from medjax.config import load_config
from medjax.models import PUBLISHED_PARAMS, get_preset, init_decoder

GiB = 2 ** 30


def test_memory_and_device_parsing():
    assert planner.parse_memory("80GB") == 80e9
    assert planner.parse_memory("96GiB") == 96 * GiB
    assert planner.parse_memory("512MiB") == 512 * 2 ** 20
    assert planner.parse_device("v5p-64") == ("v5p", 95 * GiB, 32)      # 64 cores = 32 chips
    assert planner.parse_device("v5litepod-16") == ("v5e", 16 * GiB, 16)
    # one hardware table (medjax/ops/hardware.py): the H100's memory as XLA's target config states it
    assert planner.parse_device("H100") == ("h100", 84_942_979_072, None)
    assert planner.parse_device("a100-40") == ("a100-40", 40 * GiB, None)
    meminfo = open("/proc/meminfo").read().split("\n")[0].split()       # MemTotal:  N kB
    kind, host_bytes, count = planner.parse_device("cpu")                 # host RAM as one device
    assert (kind, count) == ("cpu", 1)
    assert abs(host_bytes - int(meminfo[1]) * 1024) < 0.05 * host_bytes
    with pytest.raises(ValueError, match="--device 'h100-8'"):
        planner.parse_device("h100-8")
    with pytest.raises(ValueError, match="expected e.g. 80GB"):
        planner.parse_memory("lots")


def _norm_elements(m):
    return (2 * m.num_layers + 1) * m.hidden_size


def test_llama3_70b_fsdp_bytes_by_hand():
    """70B on 32 devices, fsdp: every matrix split 32 ways, norms replicated, fp32 master
    params + fp32 grads + two fp32 AdamW moments."""
    cfg = load_config(None, ["model.preset=llama3-70b", "mesh.preset=fsdp"])
    live_before = sum(a.nbytes for a in jax.live_arrays())
    p = planner.plan(cfg, 32)
    assert sum(a.nbytes for a in jax.live_arrays()) - live_before < 1e6   # shapes only
    m = get_preset("llama3-70b")
    assert p.total_params == p.trainable == PUBLISHED_PARAMS["llama3-70b"]
    norms = _norm_elements(m)
    local = (p.total_params - norms) / 32 + norms
    assert p.params == 4 * local and p.grads == 4 * local and p.optimizer == 8 * local
    assert p.axis_sizes == {"stage": 1, "data": 1, "fsdp": 32, "tensor": 1, "expert": 1}


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_bf16_compute_charges_the_layer_scans_stacked_gradient_in_bf16(param_dtype):
    """Full fine-tuning trains fp32 masters whatever ``model.param_dtype`` (the checkpoint's
    dtype); under the layer scan with bf16 compute their stacked gradient is bf16
    (``stack.compute_weights``): 2 bytes per stacked element, 4 for the rest; a pipelined
    step's is its fp32 micro-batch accumulator (models/pipeline.py): 4 for all, plus 4 / R per
    stacked element for the block gradient each backward iteration stacks before adding it."""
    common = ["model.preset=tiny-llama2", "mesh.preset=fsdp", "model.dtype=bfloat16",
              f"model.param_dtype={param_dtype}", "train.batch_size=8"]
    p = planner.plan(load_config(None, common), 1)
    m = get_preset("tiny-llama2")
    stacked = p.trainable - 2 * m.vocab_size * m.hidden_size - m.hidden_size
    assert p.grads == 2 * stacked + 4 * (p.trainable - stacked)
    piped = planner.plan(load_config(None, common + ["mesh.stage=2", "train.grad_accum=2"]), 2)
    # a stage holds half the layers; its backward stacks the block's (R = 1: the stage's) gradient
    assert piped.grads == 4 * (p.trainable - stacked / 2) + 4 * stacked / 2


def test_fsdp_ep_splits_experts_and_lora_trains_adapters_only():
    from medjax.lora import apply_lora, count_params
    overrides = ["model.preset=tiny-mixtral", "mesh.preset=fsdp_ep", "mesh.expert=4",
                 "lora.enabled=true", "lora.rank=4", "model.param_dtype=bfloat16"]
    cfg = load_config(None, overrides)
    p = planner.plan(cfg, 4)
    model = init_decoder(get_preset("tiny-mixtral"))
    apply_lora(model, cfg.lora)
    assert p.trainable == count_params(model, nnx.LoRAParam)
    assert p.total_params == count_params(model, nnx.Param)
    m = get_preset("tiny-mixtral")
    expert_elems = m.num_layers * 3 * m.num_experts * m.hidden_size * m.intermediate_size
    base = p.total_params - p.trainable
    # bf16 base: experts split 4 ways, the rest replicated; adapters (fp32) mostly replicated
    assert p.params > 2 * (base - expert_elems + expert_elems / 4)
    assert p.params < 2 * (base - expert_elems + expert_elems / 4) + 4 * p.trainable + 1
    assert p.optimizer == 2 * p.grads


def test_adafactor_factors_large_matrices():
    cfg = load_config(None, ["model.preset=smollm2-135m", "optim.name=adafactor", "mesh.preset=dp"])
    p = planner.plan(cfg, 1)
    adam = planner.plan(load_config(None, ["model.preset=smollm2-135m", "mesh.preset=dp"]), 1)
    assert p.optimizer < adam.optimizer / 100


def test_activations_grow_with_remat_level_and_shrink_with_devices():
    base = ["model.preset=llama3-8b", "mesh.preset=fsdp", "data.seq_len=2048", "train.batch_size=8"]
    m, sizes = get_preset("llama3-8b"), {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    acts = {r: planner.activation_bytes(load_config(None, base + [f"model.remat={r}"]), m, sizes)[1]
            for r in ("none", "dots_saveable", "full")}
    assert acts["full"] < acts["dots_saveable"] < acts["none"]
    _, half = planner.activation_bytes(
        load_config(None, base + ["model.remat=full", "train.batch_size=4"]), m, sizes)
    assert math.isclose(half, acts["full"] / 2, rel_tol=1e-9)
    # remat=full keeps one [tokens, hidden] input per layer: check that term by hand
    _, longer = planner.activation_bytes(
        load_config(None, base + ["model.remat=full", "model.dtype=bfloat16"]), m,
        {**sizes, "fsdp": 1, "data": 8})
    assert longer == planner.activation_bytes(
        load_config(None, base + ["model.remat=full", "model.dtype=bfloat16"]), m, sizes)[1]


def test_cli_warns_when_over_memory(capsys):
    rc = plan_main(["model.preset=smollm2-135m", "mesh.preset=fsdp", "--device-memory", "1GB",
                       "--num-devices", "1"])
    out = capsys.readouterr().out
    assert rc == 1 and "WARNING: needs" in out and "134,515,008 params" in out
    rc = plan_main(["model.preset=tiny-llama", "--device-memory", "16GB", "--num-devices", "1"])
    assert rc == 0 and "fits:" in capsys.readouterr().out
    rc = run_cli(plan_main, ["model.preset=llama3-8b", "mesh.preset=fsdp_tp", "mesh.tensor=16",
                                "--num-devices", "16"])
    assert rc == 2 and "num_kv_heads=8 is not divisible by mesh.tensor=16" in capsys.readouterr().err



def test_moe_temporaries_charge_the_gathered_expert_weights_under_fsdp():
    """Without an expert axis a batch split over devices runs each MoE layer with its experts
    whole on every device (models/moe_dispatch.py): the planner's MoE temporaries add one layer's
    fsdp-split expert weights, whole (bf16 base; fp32 adapters with an ``embed`` dim), and
    nothing when the experts are not split (dp: they are arguments)."""
    overrides = ["model.preset=tiny-mixtral", "lora.enabled=true", "lora.rank=4",
                 "lora.targets=[gate_proj,up_proj,down_proj]", "model.param_dtype=bfloat16",
                 "model.dtype=bfloat16", "data.seq_len=64", "train.batch_size=8"]
    fsdp = planner.plan(load_config(None, overrides + ["mesh.preset=fsdp"]), 8).moe["temp_bytes"]
    dp = planner.plan(load_config(None, overrides + ["mesh.preset=dp"]), 8).moe["temp_bytes"]
    m = get_preset("tiny-mixtral")
    E, H, I, r = m.num_experts, m.hidden_size, m.intermediate_size, 4
    base = 3 * E * H * I * 2                       # gate, up [E, H, I] and down [E, I, H], bf16
    adapters = 3 * E * H * r * 4                   # gate/up lora_a [E, H, r], down lora_b [E, r, H]
    assert fsdp - dp == base + adapters, (fsdp - dp, base, adapters)


def test_pipeline_stages_split_the_layers_and_report_bubble_and_ppermute_bytes():
    """mesh.stage=4 × fsdp 2 on 8 devices: each device holds a quarter of the layers (their
    matrices also split over fsdp), the embedding and head on every stage (split over fsdp
    only); bubble (S-1)/(R*M+S-1) and the activations one device sends per step."""
    cfg = load_config(None, ["model.preset=llama2-7b", "mesh.preset=fsdp", "mesh.stage=4",
                             "mesh.fsdp=2", "train.grad_accum=8", "train.batch_size=16"])
    p = planner.plan(cfg, 8)
    m = get_preset("llama2-7b")
    H, V, L = m.hidden_size, m.vocab_size, m.num_layers
    layer_norms, outside = 2 * L * H, 2 * V * H
    matrices = p.total_params - layer_norms - outside - H
    local = matrices / 8 + layer_norms / 4 + outside / 2 + H
    assert p.axis_sizes == {"stage": 4, "data": 1, "fsdp": 2, "tensor": 1, "expert": 1}
    assert p.params == 4 * local and p.optimizer == 8 * local
    # + the stage's stacked fp32 gradient the backward iteration makes before adding it (R = 1)
    assert p.grads == 4 * local + 4 * (matrices / 8 + layer_norms / 4)
    q = p.pipeline
    assert (q["iterations"], q["layers_per_stage"]) == (11, 8)
    assert q["bubble"] == 3 / 11
    rows = 16 / 8 / 2                     # a micro-batch's rows on one device (fsdp 2)
    assert q["ppermute_bytes"] == 2 * 11 * rows * cfg.data.seq_len * H * 4
    from medjax.plan.report import report
    assert "bubble 27.3% = (S-1)/(R*M+S-1)" in report(cfg, p, None, None)
