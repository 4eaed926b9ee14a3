"""The shapes and shared helpers of ``python -m medjax.bench gpu``'s parts (``_gpu_parts.py``,
``_gpu_serving.py``): the issue's full shapes and the ``--dry-run`` tiny ones."""
from __future__ import annotations

FULL = {
    # Llama-2-7B heads (32 x 128 MHA) and Llama-3-8B GQA (32 query / 8 KV heads).
    "attention": dict(seqs=(2048, 4096, 8192, 32768), heads=((32, 32), (32, 8)), D=128, batch=1,
                      iters=5),
    "train": dict(model="preset:llama2-7b", seq=4096, batches=(1, 2, 4), rank=64, steps=3),
    # MedQA test prompts are 111..381 tokens (5th..95th percentile, mean 220; SmolLM2's tokenizer
    # over the 1273 prompts of ../shared/data/benchmarks, 2026-12-06); letters scored as one token.
    "mcqa": dict(preset="llama2-7b", items=256, lengths=(111, 381), hf_batch=32),
    "decode": dict(preset="llama2-7b", batches=(1, 16), prompt=128, new=512),
    "moe": dict(tokens=4096, preset="mixtral-8x7b", steps=5),     # the preset's exact width
}
DRY = {
    "attention": dict(seqs=(64,), heads=((4, 4), (4, 1)), D=32, batch=1, iters=1),
    "train": dict(model="preset:tiny-llama2", seq=32, batches=(1,), rank=4, steps=1),
    "mcqa": dict(preset="tiny-llama2", items=12, lengths=(10, 40), hf_batch=4),
    "decode": dict(preset="tiny-llama2", batches=(1, 2), prompt=8, new=8),
    "moe": dict(tokens=32, preset="tiny-mixtral", steps=1),
}
DTYPE = "bfloat16"
REFERENCE_MAX_SCORE_BYTES = 16 * 2**30   # fp32 [B, H, T, T] scores of the reference (T=8k: 8 GiB)
LETTERS = (65, 66, 67, 68)               # the four answer-letter token ids (any ids below vocab)


def error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def chip_peak_flops(device_kind):
    from medjax.ops.hardware import chip_of
    chip = chip_of(device_kind or "")
    return chip.bf16_flops if chip else None
