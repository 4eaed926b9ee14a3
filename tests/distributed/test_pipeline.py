"""Pipeline parallelism (``mesh.stage``, ``train.pipeline_repeats``; medjax/models/pipeline.py)
through the product path: ``python -m medjax.train``'s ``main`` in-process on the session's 8
simulated CPU devices (tests/conftest.py) gives the per-step losses of the same run on one
device (full fine-tuning with remat, LoRA, Mixtral LoRA on experts + router, Mixtral nf4
QLoRA, DPO); the compiled step moves activations with collective-permutes and gathers no layer
weight across stages; a run saved with 2 stages resumes with 1; bad pipeline shapes are one
``error:`` line naming both numbers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.cli_errors import run_cli
from tests.distributed import hlo_groups

pytestmark = [pytest.mark.multidevice, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CPT = str(ROOT / "configs" / "meditron_llama2_cpt.yaml")          # full fine-tuning
LORA = str(ROOT / "configs" / "melt_llama2_lora.yaml")            # LoRA on all 7 projections
MIXTRAL = str(ROOT / "configs" / "melt_mixtral_lora.yaml")        # LoRA on every expert + router
QLORA = str(ROOT / "configs" / "bimedix_mixtral_qlora.yaml")      # nf4 base, experts + router
RUN = ["model=tiny", "train.steps=3", "train.batch_size=16", "train.grad_accum=4",
       "train.export=[]", "eval.tasks=[]", "data.heldout_rows=0", "data.seq_len=32",
       "lora.dropout=0", "checkpoint.every=0"]
MODELS = {  # name -> (config, 8-layer tiny preset: cut into 4 stages x 2 repeats, overrides)
    "llama_full": (CPT, "tiny-llama2-8l", ("train.neftune_alpha=5",)),   # + Internist's NEFTune
    "llama_lora": (LORA, "tiny-llama2-8l", ("lora.dropout=0.05",)),       # the recipe's dropout
    # Mixtral: Adam's first step is ~lr * sign(g); a gradient element near 0 whose sign differs
    # by rounding (measured: gradients equal to 4e-7 relative, one such sign flip in v_proj's
    # lora_b) moved the step-2 loss by 4.6e-5 at lr 5e-4 with the default eps 1e-8. With eps
    # 1e-6 such elements take tiny steps and the losses agree to 5e-7 at the overlay's lr 2e-3.
    "mixtral_lora": (MIXTRAL, "tiny-mixtral-8l", ("optim.eps=0.000001",)),
    "mixtral_qlora": (QLORA, "tiny-mixtral-8l", ("optim.eps=0.000001",)),
}
ONE = ["mesh.preset=dp", "mesh.data=1"]
STAGE2_FSDP4 = ["mesh.preset=fsdp", "mesh.stage=2", "mesh.fsdp=4"]
STAGE4_DATA2 = ["mesh.preset=dp", "mesh.stage=4", "mesh.data=2"]
STAGE2_EXPERT4 = ["mesh.preset=fsdp_ep", "mesh.stage=2", "mesh.expert=4"]   # EP inside a stage


def _train(out_dir, config, *overrides, resume=False) -> int:
    from medjax.train.__main__ import main
    argv = ["--no-progress", "--config", config, *RUN, f"train.out_dir={out_dir}", *overrides]
    return run_cli(main, argv + (["--resume"] if resume else []))


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """name -> the 1-device losses (computed on first use)."""
    cache = {}

    def losses(name, mesh_devices):
        if name not in cache:
            config, preset, extra = MODELS[name]
            out = tmp_path_factory.mktemp(f"one-{name}")
            with mesh_devices.use(1):
                assert _train(out, config, f"model.preset={preset}", *extra, *ONE) == 0
            cache[name] = _losses(out)
        return cache[name]
    return losses


@pytest.mark.parametrize("name, mesh, repeats", [
    ("llama_full", STAGE2_FSDP4, 1), ("llama_full", STAGE4_DATA2, 1),
    ("llama_full", STAGE2_FSDP4, 2),
    ("llama_full", STAGE4_DATA2 + ["model.remat=dots_saveable"], 2),   # the recipe's is full
    ("llama_lora", STAGE2_FSDP4, 1), ("llama_lora", STAGE4_DATA2, 2),
    ("mixtral_lora", STAGE4_DATA2, 1),          # R = 2: test_moe_dropout_... below
    ("mixtral_qlora", STAGE2_FSDP4, 1), ("mixtral_lora", STAGE2_EXPERT4, 1),
], ids=lambda x: x if isinstance(x, str) else "x".join(m.split("=")[1] for m in x[1:])
   if isinstance(x, list) else f"R{x}")
def test_pipeline_trains_like_one_device(tmp_path, mesh_devices, one_device, name, mesh, repeats):
    """4 micro-batches (train.grad_accum) through S stages × R repeats on 8 devices: the three
    steps' losses equal the 1-device run's within 1e-5."""
    config, preset, extra = MODELS[name]
    with mesh_devices.use(8):
        assert _train(tmp_path, config, f"model.preset={preset}", *extra, *mesh,
                      f"train.pipeline_repeats={repeats}") == 0
    got, ref = _losses(tmp_path), one_device(name, mesh_devices)
    assert len(got) == len(ref) == 3
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert ref[0] != ref[-1]                  # it trained


def test_moe_dropout_pipeline_trains_like_the_same_rows_per_device(tmp_path, mesh_devices):
    """Mixtral LoRA with the recipe's dropout (0.05) on every expert: 2 stages x fsdp 4, R = 2,
    gives the losses of fsdp 4 without stages within 1e-5. Not those of one device: a MoE layer
    routes each device's own rows (models/moe_dispatch.py), and the dropout mask is drawn over
    that device's routed rows, so it depends on how many devices split a micro-batch (fsdp 4
    vs 1 device: 1e-4 apart at step 2; dense layers draw over the whole batch and equal one
    device, the llama_lora cases above). The pipeline keeps a micro-batch's rows on the 4
    devices of a stage, as fsdp 4 does."""
    config, preset, extra = MODELS["mixtral_lora"]
    extra = [f"model.preset={preset}", *extra, "lora.dropout=0.05"]
    with mesh_devices.use(4):
        assert _train(tmp_path / "fsdp4", config, *extra, "mesh.preset=fsdp", "mesh.fsdp=4") == 0
    with mesh_devices.use(8):
        assert _train(tmp_path / "pp", config, *extra, *STAGE2_FSDP4,
                      "train.pipeline_repeats=2") == 0
    ref, got = _losses(tmp_path / "fsdp4"), _losses(tmp_path / "pp")
    assert len(ref) == len(got) == 3 and ref[0] != ref[-1]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_dpo_pipeline_trains_like_one_device(tmp_path, mesh_devices):
    """Med42's DPO as the recipe has it (full fine-tuning, the frozen-copy reference: two
    pipelined forwards per step, chosen and rejected rows of each micro-batch together) with
    2 stages x fsdp 4: 4 steps within 1e-5. (LoRA dropout's masks: the llama_lora cases.)"""
    run = ["--config", str(ROOT / "configs" / "med42_dpo.yaml")]
    extra = ["train.steps=4", "train.grad_accum=2", "data.seq_len=128",
             "data.long_examples=truncate", "train.batch_size=16"]
    from medjax.train.__main__ import main

    def train(out, *mesh):
        return run_cli(main, ["--no-progress", *run, *RUN, *extra, f"train.out_dir={out}", *mesh])
    with mesh_devices.use(1):
        assert train(tmp_path / "one", *ONE) == 0
    with mesh_devices.use(8):
        assert train(tmp_path / "pp", *STAGE2_FSDP4) == 0
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "pp")
    assert len(ref) == len(got) == 4 and len(set(ref)) > 1
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def _compiled_step(overrides) -> tuple[str, tuple, object]:
    import jax

    from medjax import sharding
    from medjax.config import load_config
    from medjax.models import get_preset
    from medjax.plan.compile import abstract_step
    cfg = load_config([CPT], [*RUN, *overrides])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:8])
    step, args = abstract_step(cfg, mesh, get_preset(cfg.model.preset))
    shape = tuple(mesh.shape[a] for a in sharding.MESH_AXES)
    return step.lower(*args).compile().as_text(), shape, args


def _assert_stages_pass_activations_not_weights(hlo, shape, weights, activation) -> None:
    """``hlo`` (a program on a mesh of ``shape``, ``stage`` its first axis) moves activations
    (regex ``activation``) between the stages with collective-permutes, forward and backward
    (training) or at least once (inference), no collective-permute or all-gather that spans the
    stages carries a layer weight (a shape whose trailing dims are in ``weights``), and no
    all-to-all spans them (the circular schedule's weights are held in stage order: without it
    the step regrouped every stacked weight and gradient with stage-spanning all-to-alls)."""
    per_stage = int(np.prod(shape[1:]))
    crossing = []
    for line in hlo_groups.collectives(hlo, "collective-permute"):
        pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[1].split("}}")[0] + "}")
        if any(int(a) // per_stage != int(b) // per_stage for a, b in pairs):
            crossing.append(line)
    assert [line for line in crossing if re.search(activation, line)], crossing
    spanning = [(line, "sent") for line in crossing] + [
        (line, "gathered") for line in hlo_groups.groups_spanning(hlo, "all-gather", shape, 0)]
    for line, how in spanning:
        result = line.split("=", 1)[1].split(" collective-permute")[0].split(" all-gather")[0]
        for dims in re.findall(r"\w+\[([\d,]*)\]", result):
            dims = tuple(int(d) for d in dims.split(",") if d)
            assert dims[-2:] not in weights, f"a layer weight {how} across stages: {line[:300]}"
    assert not hlo_groups.groups_spanning(hlo, "all-to-all", shape, 0)


def _layer_kernel_shapes(tree) -> set:
    import jax
    return {tuple(leaf.shape[-2:]) for leaf in jax.tree.leaves(tree) if leaf.ndim >= 3}


@pytest.mark.parametrize("repeats", [1, 2], ids=["R1", "R2"])
def test_compiled_step_permutes_activations_and_gathers_no_other_stage_weights(repeats):
    """Stage 2 × fsdp 4, full fine-tuning of an 8-layer Llama, GPipe and circular (R = 2): the
    step's HLO holds collective-permutes between the two stages (the activations, forward and
    backward); every all-gather of a layer weight stays within a stage (fsdp), and the
    all-gathers that do span the stages carry activations (embedding rows), none a layer
    weight's trailing shape; no all-to-all spans the stages (R = 2 before the train state held
    its layers in stage order: 18 of them, every weight and gradient regrouped each step)."""
    _, preset, extra = MODELS["llama_full"]            # the llama_full-2x4-R1 / R2 runs' steps
    hlo, shape, args = _compiled_step([f"model.preset={preset}", *extra, *STAGE2_FSDP4,
                                       f"train.pipeline_repeats={repeats}"])
    activation = r"f32\[1,\d+,32,64\]"
    assert len([line for line in hlo_groups.collectives(hlo, "collective-permute")
                if re.search(activation, line)]) >= 2          # forward roll and its transpose
    weights = _layer_kernel_shapes(args[0].params)              # stacked [L, in, out] kernels
    assert weights
    _assert_stages_pass_activations_not_weights(hlo, shape, weights, activation)
    gathers = hlo_groups.collectives(hlo, "all-gather")
    in_stage = [g for g in gathers if not hlo_groups.groups_spanning(g, "all-gather", shape, 0)]
    assert any(re.search(r"f32\[1,64,(64|128|32)\]", g) for g in in_stage)   # fsdp weight gathers


@pytest.mark.parametrize("first, second", [(STAGE4_DATA2 + ["train.pipeline_repeats=2"], ONE),
                                           (ONE, STAGE4_DATA2 + ["train.pipeline_repeats=2"])],
                         ids=["stage4R2-then-1", "stage1-then-4R2"])
def test_checkpoint_resumes_with_another_stage_count(tmp_path, mesh_devices, first, second):
    """Checkpoints hold the ``[L, ...]`` layer stack in layer order (the circular schedule's
    train state holds it in stage order: reordered at the save and after the restore): 2 steps
    saved with one stage count (4 stages x R = 2, or 1) and resumed for 2 more with the other
    give the losses of the same interrupted run on one device (the interruption itself changes
    nothing but the stage count: ``train.steps`` of the first part shapes its schedule)."""
    config, preset, _ = MODELS["llama_full"]
    common = [f"model.preset={preset}", "checkpoint.every=2"]

    def interrupted(out, first, second):
        with mesh_devices.use(8 if first != ONE else 1):
            assert _train(out, config, *common, *first, "train.steps=2") == 0
        with mesh_devices.use(8 if second != ONE else 1):
            assert _train(out, config, *common, *second, "train.steps=4", resume=True) == 0
        return _losses(out)
    ref = interrupted(tmp_path / "ref", ONE, ONE)
    got = interrupted(tmp_path / "pp", first, second)
    assert len(ref) == 4 and len(got) == 4, got
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 8])
def test_stage_order_gives_the_layer_order_logits(rows, monkeypatch):
    """An 8-layer Llama's stacked layers put in stage order for 4 stages x 2 repeats
    (``pipeline.LayerOrder``) and run by the circular schedule (``pipeline_repeats=2``) give
    the logits of the model in layer order, on one device: 8 rows (4 micro-batches) and 1 row
    (1 micro-batch, fewer than the stages: the schedule's idle slots); ``to_logical`` gives the
    arrays back; stage ``s``'s slice holds layers ``s`` and ``4 + s``. The reorder's programs
    (one per stacked leaf) run one at a time, each settled before the next is dispatched
    (dispatched together they deadlocked XLA:CPU's device threads under load:
    ``LayerOrder._reorder``)."""
    from flax import nnx

    from medjax.models import get_preset, init_decoder, pipeline
    from medjax.models.pipeline import LayerOrder
    events, swap = [], pipeline._swap_blocks
    monkeypatch.setattr(pipeline, "_swap_blocks", lambda x, *a: events.append("swap") or swap(x, *a))
    monkeypatch.setattr(pipeline, "settle", lambda x: events.append("settle") or jax.block_until_ready(x))
    cfg = get_preset("tiny-llama2-8l")
    model = init_decoder(cfg, scan_layers=True)
    ids = jax.random.randint(jax.random.key(0), (rows, 16), 0, cfg.vocab_size)
    ref = model(ids)
    order = LayerOrder(stages=4, repeats=2, num_layers=cfg.num_layers)
    state = nnx.state(model)
    moved = order.to_stages(state)
    kernel = lambda st: st["model"]["layers"]["mlp"]["up_proj"]["kernel"].get_value()   # noqa: E731
    np.testing.assert_array_equal(kernel(moved), np.asarray(kernel(state))[[0, 4, 1, 5, 2, 6, 3, 7]])
    piped = nnx.merge(nnx.graphdef(model), moved)
    piped.pipeline_stages, piped.pipeline_repeats = 4, 2
    np.testing.assert_allclose(piped(ids), ref, rtol=0, atol=1e-5)
    back = order.to_logical(moved)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    stacked = sum(x.ndim > 0 and x.shape[0] == cfg.num_layers for x in jax.tree.leaves(state))
    assert events == ["swap", "settle"] * 2 * stacked and stacked >= 9   # 7 projections, 2 norms


def _eval(model, out_json, *flags) -> dict:
    from medjax.eval.__main__ import main
    argv = ["--model", str(model), "--data-dir", str(ROOT.parent / "shared" / "data" / "benchmarks"),
            "--log-samples", "--output", str(out_json), *flags]
    assert run_cli(main, argv) == 0
    return json.loads(Path(out_json).read_text())


def _same_scores(got: dict, ref: dict) -> None:
    assert got["samples"].keys() == ref["samples"].keys()
    for task, samples in ref["samples"].items():
        assert len(samples) == len(got["samples"][task]) > 0
        for a, b in zip(samples, got["samples"][task]):
            assert (a["doc_id"], a["acc"]) == (b["doc_id"], b["acc"])
            assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=1e-5, rel=1e-6)


def test_heldout_eval_scoring_and_export_unchanged_by_stages(tmp_path, mesh_devices):
    """With mesh.stage=2 and the circular schedule (R = 2: the train state holds its layers in
    stage order) the run's held-out losses (the pipeline run on the train state) and its HF
    export (the model in layer order) equal the 1-device run's (within 1e-5); and inference runs
    through the pipeline as one device computes it: ``python -m medjax.eval`` of the HF export
    loaded straight into ``mesh.stage=4 mesh.data=2`` (letter scoring, packed and bucketed:
    per-choice log-likelihoods), and generation from the run on its own mesh (stage 2 x fsdp 4;
    the KV cache split over the stages with its layers: prefill and decode logits). The
    compiled prefill moves activations between the stages and gathers no layer weight across
    them."""
    from safetensors.numpy import load_file
    config, preset, _ = MODELS["llama_full"]
    extra = [f"model.preset={preset}", "data.heldout_rows=8", "train.export=[hf]", "train.steps=2"]
    with mesh_devices.use(1):
        assert _train(tmp_path / "one", config, *extra, *ONE) == 0
    with mesh_devices.use(8):
        assert _train(tmp_path / "pp", config, *extra, *STAGE2_FSDP4,
                      "train.pipeline_repeats=2") == 0
    heldout = [[r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text()
                                       .splitlines()) if r.get("kind") != "train" and "loss" in r]
               for d in ("one", "pp")]
    assert heldout[0] and len(heldout[0]) == len(heldout[1])
    np.testing.assert_allclose(heldout[1], heldout[0], rtol=0, atol=1e-5)
    one, pp = (load_file(str(tmp_path / d / "export" / "hf" / "model.safetensors")) for d in ("one", "pp"))
    assert sorted(one) == sorted(pp) and any(".layers.7." in k for k in one)
    for name in one:
        np.testing.assert_allclose(pp[name], one[name], rtol=0, atol=1e-5, err_msg=name)

    letter = ["--tasks", "medmcqa,medqa_4options", "--limit", "4"]
    with mesh_devices.use(1):
        ref = _eval(tmp_path / "one" / "export" / "hf", tmp_path / "one.json", *letter)
    with mesh_devices.use(8):
        got = _eval(tmp_path / "pp" / "export" / "hf", tmp_path / "pp.json", *letter,
                    "mesh.stage=4", "mesh.data=2")
    _same_scores(got, ref)

    import medjax
    from medjax.eval.generate import Generator
    prompts = [list(b"Aspirin is"), list(b"The heart"), list(b"A"), list(b"Insulin lowers")]
    logits = []
    for run, devices in (("one", 1), ("pp", 8)):        # the run on its own mesh: 2 stages
        with mesh_devices.use(devices):
            model, _ = medjax.load(tmp_path / run)
            generator = Generator(model)
            logits.append(generator.generate(prompts, max_new_tokens=3, return_logits=True)[1])
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-5)

    # the prefill just run (the same shapes: a compile-cache hit) through the split KV cache
    assert model.pipeline_stages == 2
    P = 32                                              # bucket() of the longest prompt
    with mesh_devices.use(8):
        hlo = generator._prefill.lower(
            generator.state, jnp.zeros((4, P), jnp.int32), jnp.ones((4,), jnp.int32),
            model.init_cache(4, P + 3), jax.random.key(0)).compile().as_text()
    mesh = next(x.sharding.mesh for x in jax.tree.leaves(generator.state) if hasattr(x, "sharding"))
    _assert_stages_pass_activations_not_weights(
        hlo, tuple(mesh.shape.values()), _layer_kernel_shapes(generator.state), r"f32\[1,\d+,32,64\]")


@pytest.mark.parametrize("overrides, words", [
    (["model.preset=tiny-llama2", "mesh.stage=4", "mesh.data=2", "train.grad_accum=4"],
     ["model.num_layers=2", "mesh.stage=4"]),
    (["model.preset=tiny-llama2-8l", "mesh.stage=2", "train.pipeline_repeats=3",
      "train.grad_accum=4", "train.batch_size=12"], ["model.num_layers=8", "train.pipeline_repeats=3"]),
    (["model.preset=tiny-llama2-8l", "mesh.stage=4", "mesh.data=2", "train.grad_accum=2"],
     ["train.grad_accum=2", "mesh.stage=4"]),
    (["model.preset=tiny-llama2-8l", "mesh.stage=3", "train.grad_accum=4"],
     ["mesh.stage=3", "8 devices"]),
])
def test_bad_pipeline_shapes_are_one_error_line(tmp_path, mesh_devices, capsys, overrides, words):
    with mesh_devices.use(8):
        assert _train(tmp_path / "run", CPT, "mesh.preset=dp", *overrides) == 2
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), lines
    assert all(w in lines[-1] for w in words), lines[-1]
    assert "Traceback" not in "\n".join(lines)
