"""Rendered text → token arrays (``input_ids``, ``targets``, ``loss_mask``) and long-example handling.

Targets and the loss mask are computed per example BEFORE packing: ``targets[t] = ids[t+1]`` and
``loss_mask[t] = 1`` iff token ``t+1`` lies in a scored span. The last token of an example has
nothing to predict (``targets = pad``, ``loss_mask = 0``), so concatenating examples into a packed
row never scores a prediction across two examples. Splitting a long example keeps each chunk's
real next-token target at the cut.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from medjax.data.formats import Rendered

KEYS = ("input_ids", "targets", "loss_mask")


def encode_rendered(rendered: Rendered, tokenizer) -> dict[str, np.ndarray]:
    ids, offsets = tokenizer.encode_with_offsets(rendered.text)
    starts_T = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    scored_T = np.zeros(len(ids), dtype=bool)
    for start, end in rendered.spans:
        scored_T |= (starts_T >= start) & (starts_T < end)
    if rendered.add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids, scored_T = [tokenizer.bos_id] + ids, np.concatenate([[False], scored_T])
    if rendered.add_eos and tokenizer.eos_id is not None:
        # the EOS closing a scored span is scored too: the model must learn to stop
        ids, scored_T = ids + [tokenizer.eos_id], np.concatenate([scored_T, scored_T[-1:] if len(scored_T) else [True]])
    ids_T = np.asarray(ids, dtype=np.int32)
    targets_T = np.full_like(ids_T, tokenizer.pad_id)
    targets_T[:-1] = ids_T[1:]
    loss_mask_T = np.zeros(len(ids_T), dtype=np.float32)
    loss_mask_T[:-1] = scored_T[1:]
    return {"input_ids": ids_T, "targets": targets_T, "loss_mask": loss_mask_T}


def encode_rendered_batch(rendered: Sequence[Rendered], tokenizer) -> list[dict[str, np.ndarray]]:
    """``encode_rendered`` for many texts with one tokenizer call (the pipeline's path; same arrays)."""
    encoded = tokenizer.encode_batch_with_offsets([r.text for r in rendered])
    return [_example_arrays(r, ids, offsets, tokenizer) for r, (ids, offsets) in zip(rendered, encoded)]


def _example_arrays(rendered: Rendered, ids: list, offsets: list, tokenizer) -> dict[str, np.ndarray]:
    bos = rendered.add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id)
    eos = rendered.add_eos and tokenizer.eos_id is not None
    n = len(ids)
    ids_T = np.empty(n + bos + eos, dtype=np.int32)
    ids_T[bos:bos + n] = ids
    if bos:
        ids_T[0] = tokenizer.bos_id
    if eos:
        ids_T[-1] = tokenizer.eos_id
    # scored_T[t]: token t starts inside a scored span (BOS never; a closing EOS as the token before it)
    scored_T = np.zeros(len(ids_T), dtype=bool)
    if n:
        starts_N = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=n)
        for start, end in rendered.spans:
            scored_T[bos:bos + n] |= (starts_N >= start) & (starts_N < end)
    if eos:
        scored_T[-1] = scored_T[-2] if n + bos else True
    targets_T = np.empty_like(ids_T)
    targets_T[:-1] = ids_T[1:]
    targets_T[-1:] = tokenizer.pad_id
    loss_mask_T = np.zeros(len(ids_T), dtype=np.float32)
    loss_mask_T[:-1] = scored_T[1:]
    return {"input_ids": ids_T, "targets": targets_T, "loss_mask": loss_mask_T}


def fit_length(example: dict[str, np.ndarray], seq_len: int, mode: str, prefixes=("",)) -> list[dict]:
    """Examples no longer than ``seq_len``: ``split`` into chunks, ``truncate`` or ``drop``.

    For preference pairs (``prefixes=("chosen_", "rejected_")``) both sides are truncated or the pair
    is dropped (splitting a pair has no meaning)."""
    length = max(len(example[p + "input_ids"]) for p in prefixes)
    if length <= seq_len:
        return [example]
    if mode == "drop":
        return []
    if mode == "truncate" or len(prefixes) > 1:  # a preference pair is never split
        return [{k: v[:seq_len] for k, v in example.items()}]
    chunks = [{k: v[start:start + seq_len] for k, v in example.items()} for start in range(0, length, seq_len)]
    return [c for c in chunks if c["loss_mask"].any() or len(chunks) == 1]


def stack_columns(examples: list[dict], prefixes=("",)) -> list[dict]:
    """Each sequence's ``KEYS`` as ONE ``[L, 3]`` int32 array (the loss mask's float32 bits), so the
    packer places one array per sequence instead of three; ``unstack_columns`` undoes it."""
    out = []
    for example in examples:
        row = {}
        for p in prefixes:
            columns_L3 = np.empty((len(example[p + "input_ids"]), 3), dtype=np.int32)
            columns_L3[:, 0] = example[p + "input_ids"]
            columns_L3[:, 1] = example[p + "targets"]
            columns_L3[:, 2] = example[p + "loss_mask"].view(np.int32)
            row[p] = columns_L3
        out.append(row)
    return out


def unstack_columns(packed: dict[str, np.ndarray], prefixes=("",)) -> dict[str, np.ndarray]:
    """A packed row of ``stack_columns`` sequences → the batch contract's five keys (padding: 0, 0.0)."""
    row = {}
    for p in prefixes:
        columns_T3 = packed[p]
        row[p + "input_ids"] = np.ascontiguousarray(columns_T3[:, 0])
        row[p + "targets"] = np.ascontiguousarray(columns_T3[:, 1])
        row[p + "loss_mask"] = np.ascontiguousarray(columns_T3[:, 2]).view(np.float32)
        row[p + "positions"] = packed[p + "_positions"]
        row[p + "segment_ids"] = packed[p + "_segment_ids"]
    return row


def pad_row(example: dict[str, np.ndarray], seq_len: int, prefixes=("",)) -> dict[str, np.ndarray]:
    """One example in one row (no packing): segment 1 on its tokens, 0 on padding."""
    row = {}
    for p in prefixes:
        n = len(example[p + "input_ids"])
        for key in KEYS:
            out = np.zeros(seq_len, dtype=example[p + key].dtype)
            out[:n] = example[p + key]
            row[p + key] = out
        row[p + "positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
        row[p + "segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    return row
