"""A small grain pipeline for the training loop: JSONL (Alpaca or text) → padded [B, T] batches.

Used until (and unless) ``medjax.data`` provides the packed pipeline. Each example becomes
``[bos if the tokenizer adds one] + prompt + response + [eos]`` truncated to ``seq_len + 1`` tokens; ``targets`` are the
inputs shifted by one and ``loss_mask`` is 1 only on response tokens (the whole text for the
``text`` format). Rows are padded (``segment_ids`` 0, ``loss_mask`` 0), not packed.

Order: a seeded grain shuffle, reshuffled every epoch, repeated forever; the iterator's
``get_state()`` / ``set_state()`` (a small JSON dict) is saved with each checkpoint, so a
resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Bad training data; the message names the file and line."""

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def read_jsonl(path) -> list[dict]:
    rows = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON: {e}") from None
    if not rows:
        raise DataError(f"{path}: no records (the file is empty)")
    return rows


def prompt_and_response(row: dict, fmt: str, where: str) -> tuple[str, str]:
    if fmt == "text":
        if "text" not in row:
            raise DataError(f"{where}: text format needs a 'text' field")
        return "", row["text"]
    for key in ("instruction", "output"):
        if key not in row:
            raise DataError(f"{where}: alpaca format needs {key!r}")
    template = ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT
    return template.format(instruction=row["instruction"], input=row.get("input", "")), row["output"]


def encode_example(row: dict, tokenizer, seq_len: int, fmt: str, where: str) -> dict:
    prompt, response = prompt_and_response(row, fmt, where)
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    add_bos = getattr(tokenizer, "add_bos_token", True) and tokenizer.bos_id is not None
    bos = [tokenizer.bos_id] if add_bos else []
    ids = bos + prompt_ids + tokenizer.encode(response) + [tokenizer.eos_id]
    n_prompt = len(bos) + len(prompt_ids)
    ids = ids[: seq_len + 1]
    T = seq_len
    input_ids = np.zeros(T, np.int32)
    targets = np.zeros(T, np.int32)
    loss_mask = np.zeros(T, np.float32)
    segment_ids = np.zeros(T, np.int32)
    n = len(ids) - 1
    input_ids[:n] = ids[:-1]
    targets[:n] = ids[1:]
    segment_ids[:n] = 1
    loss_mask[max(n_prompt - 1, 0):n] = 1.0      # predict response tokens (and eos) only
    return {"input_ids": input_ids, "positions": np.arange(T, dtype=np.int32),
            "segment_ids": segment_ids, "targets": targets, "loss_mask": loss_mask}


def split_rows(rows: list[dict], heldout: int) -> tuple[list[dict], list[dict]]:
    """Last ``heldout`` rows are the held-out slice (deterministic, file order)."""
    if heldout <= 0:
        return rows, []
    if heldout >= len(rows):
        raise DataError(f"train.heldout_examples={heldout} leaves no training rows ({len(rows)} total)")
    return rows[:-heldout], rows[-heldout:]


def encode_rows(rows, tokenizer, seq_len, fmt, source) -> list[dict]:
    examples = [encode_example(r, tokenizer, seq_len, fmt, f"{source}:{i + 1}") for i, r in enumerate(rows)]
    empty = [i + 1 for i, e in enumerate(examples) if not e["loss_mask"].any()]
    if examples and len(empty) == len(examples):
        raise DataError(f"{source}: no example has a response token within data.seq_len={seq_len} "
                         "(prompts too long?)")
    if empty:
        warnings.warn(f"{source}: {len(empty)} rows (first: line {empty[0]}) have no response token "
                      f"within data.seq_len={seq_len}; they contribute no loss")
    return examples


def train_batches(examples: list[dict], batch_size: int, seed: int):
    """Infinite grain iterator of stacked batches (with ``get_state``/``set_state``)."""
    import grain
    if len(examples) < batch_size:
        raise DataError(f"{len(examples)} training examples < train.batch_size={batch_size}")
    ds = (grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None)
          .batch(batch_size, drop_remainder=True, batch_fn=_stack))
    return iter(ds)


def eval_batches(examples: list[dict], batch_size: int) -> list[dict]:
    """Fixed held-out batches; the last one is padded with all-masked rows."""
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        while len(chunk) < batch_size:
            chunk.append({k: np.zeros_like(v) for k, v in examples[0].items()})
        out.append(_stack(chunk))
    return out


def _stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return max(n_examples // batch_size, 1)


def resolve_data_path(path) -> Path:
    """``pkg://medjax/assets/...`` or a filesystem path."""
    text = str(path)
    if text.startswith("pkg://"):
        import importlib.resources
        package, _, rel = text[len("pkg://"):].partition("/")
        return Path(str(importlib.resources.files(package) / rel))
    return Path(text).expanduser()
