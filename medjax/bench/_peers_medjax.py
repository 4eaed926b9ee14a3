"""medjax's side of ``bench peers``, and the inputs every side shares.

``prepare`` writes, once per invocation, the weights (an HF directory, ``medjax.save_hf`` of the
model given: SmolLM2-135M from its GGUF, or a preset with random weights) and ``batch.npz``
(random token ids); every side, medjax's included, loads both from there, so the sides run the
same weights on the same batch. ``cpu_run`` times the trainer's own jitted step
(``bench train``'s ``build_medjax_step``, which builds it with ``_peers/protocol.py``'s
settings); ``tpu_run`` compiles it for a TPU slice as ``plan --compile`` does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medjax.bench._peers import protocol


def prepare(model: str, workdir, batch: int, seq: int, seed: int = 0) -> dict:
    """Write ``workdir/weights`` (HF dir) and ``workdir/batch.npz``; return their paths."""
    import medjax
    from medjax.bench.train import _preset
    workdir = Path(workdir)
    weights = workdir / "weights"
    if _preset(model):
        from flax import nnx
        from medjax.models import get_preset
        decoder = medjax.Decoder(get_preset(_preset(model)), rngs=nnx.Rngs(seed), scan_layers=False)
    else:
        decoder, _ = medjax.load(model)
    medjax.save_hf(decoder, weights, overwrite=True)
    vocab = min(decoder.config.vocab_size, 32000)
    ids = np.random.default_rng(seed).integers(3, vocab, (batch, seq)).astype(np.int32)
    np.savez(workdir / "batch.npz", input_ids=ids)
    return {"weights": str(weights), "batch": str(workdir / "batch.npz")}


def medjax_batch(input_ids) -> dict:
    """The trainer's batch for ``protocol``'s loss: target = next token, last position masked."""
    B, T = input_ids.shape
    mask = np.ones((B, T), np.float32)
    mask[:, -1] = 0.0
    return {"input_ids": input_ids, "targets": np.roll(input_ids, -1, axis=1),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": mask}


def cpu_run(weights: str, batch_path: str, lora: bool, steps: int) -> dict:
    """One side run (call it in a fresh process): first step, median step, loss, peak RSS."""
    try:
        import jax
        import jax.numpy as jnp
        from medjax.bench.train import build_medjax_step
        fn, state, frozen, reference, _ = build_medjax_step(weights, lora, protocol.LORA_RANK,
                                                            "float32")
        batch = {k: jnp.asarray(v) for k, v in medjax_batch(protocol.load_batch(batch_path)).items()}
        box = {"state": state}

        def step():
            box["state"], m = fn(box["state"], frozen, reference, batch)
            return float(jax.block_until_ready(m["loss"]))

        out = protocol.time_steps(step, steps)
        out["version"] = f"medjax (jax {jax.__version__})"
        return out
    except Exception as e:  # noqa: BLE001 — reported in the table like a peer's failure
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}


def tpu_overrides(mode: str, global_batch: int, seq: int, unroll: bool = False) -> list[str]:
    """The run config compiled for the TPU rows (``protocol``'s shape, dtypes and remat)."""
    return [f"model.scan_layers={str(not unroll).lower()}", "model.preset=llama2-7b", "model.dtype=bfloat16", "model.param_dtype=float32",
            "model.remat=full", "model.attention=auto", f"data.seq_len={seq}",
            f"train.batch_size={global_batch}", "train.grad_accum=1", "mesh.preset=fsdp",
            f"lora.enabled={str(mode == 'lora').lower()}", f"lora.rank={protocol.LORA_RANK}",
            f"lora.alpha={protocol.LORA_ALPHA}", f"optim.lr={protocol.LR}", "optim.schedule=constant",
            f"optim.clip_norm={protocol.CLIP_NORM}"]


def tpu_run(chip: str, count: int, mode: str, global_batch: int, seq: int, unroll: bool = False,
            hlo_path: str | None = None) -> dict:
    """Compile medjax's train step for ``count`` × ``chip`` (compile-only libtpu): the numbers of
    ``plan --compile`` (peak bytes per chip, FLOPs scaled for the layer scan, optimal_seconds);
    ``hlo_path``: the compiled step's HLO text is written there too."""
    from medjax.config import load_config
    from medjax.plan.accounting import model_config, plan
    from medjax.plan.compile import compile_plan
    cfg = load_config(None, tpu_overrides(mode, global_batch, seq, unroll))
    r = compile_plan(cfg, chip, count, model_cfg=model_config(cfg), estimate_fn=lambda n: plan(cfg, n))
    if hlo_path:
        Path(hlo_path).write_text(r["hlo_text"])
    return {"peak_bytes": r["total"], "compiled_flops": r["compiled_flops"],
            "model_flops": r["model_matmul_flops"] + r["model_attention_flops"],
            "optimal_seconds": r["optimal_seconds"], "compile_s": r["compile_seconds"],
            "kernels": r["kernels"], "layer_scan_scale": r.get("layer_scan_scale"),
            "argument_bytes": r["argument"], "temp_bytes": r["temp"], "alias_bytes": r["alias"]}
