"""Safetensors reading with the header validated before any allocation, and streaming reads.

The header is checked in full (size bound, JSON, dtypes, shapes, offsets inside the file, no
overlaps) before a single tensor byte is read; tensors are then read one at a time (optionally
a range of rows) with ``readinto`` into a fresh buffer, so loading never holds a memory map of
the file and never two full copies of the model. A sharded directory's index must agree with its
files (``check_weight_map``). ``write_safetensors`` streams a file: the header, then each
tensor's bytes chunk by chunk as they are produced; a failed write (disk full) names the file.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from medjax.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: np.dtype
    shape: tuple
    start: int      # absolute byte offset in the file
    end: int

    def read(self, rows: slice | None = None) -> np.ndarray:
        """Read the tensor (or ``rows`` of its first axis, a contiguous byte range)."""
        shape = self.shape
        start, itemsize = self.start, self.dtype.itemsize
        if rows is not None and shape:
            r0, r1, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("row slices must be contiguous")
            row_bytes = math.prod(shape[1:]) * itemsize
            start, shape = start + r0 * row_bytes, (r1 - r0, *shape[1:])
        out = np.empty(shape, self.dtype)
        buf = out.reshape(-1).view(np.uint8)
        with open(self.file, "rb") as f:
            f.seek(start)
            if f.readinto(buf) != buf.nbytes:
                raise CheckpointError(f"{self.file}: tensor {self.name!r} is truncated")
        return out

    def read_region(self, rows: slice, cols: slice | None = None, lead: int | None = None) -> np.ndarray:
        """``W[lead][rows, cols]`` of a 2-D tensor (3-D with ``lead``), reading only those bytes.

        Contiguous rows (``cols`` whole) are one read; a column range reads one span per row
        with ``os.preadv`` straight into the output, so no byte outside the region is read.
        """
        shape = self.shape if lead is None else self.shape[1:]
        if len(shape) != 2:
            raise ValueError(f"read_region needs a 2-D matrix, {self.name!r} is {list(self.shape)}")
        (r0, r1, rs), (c0, c1, cs) = rows.indices(shape[0]), (cols or slice(None)).indices(shape[1])
        if rs != 1 or cs != 1:
            raise ValueError("regions must be contiguous")
        itemsize, row_bytes = self.dtype.itemsize, shape[1] * self.dtype.itemsize
        base = self.start + (0 if lead is None else lead * shape[0] * row_bytes)
        out = np.empty((r1 - r0, c1 - c0), self.dtype)
        buf = out.reshape(-1).view(np.uint8)
        fd = os.open(self.file, os.O_RDONLY)
        try:
            if c0 == 0 and c1 == shape[1]:
                spans = [(base + r0 * row_bytes, buf)]
            else:
                width = (c1 - c0) * itemsize
                spans = [(base + r * row_bytes + c0 * itemsize, buf[i * width:(i + 1) * width])
                         for i, r in enumerate(range(r0, r1))]
            for offset, view in spans:
                while view.nbytes:            # one call reads at most ~2 GiB on Linux
                    got = os.preadv(fd, [view], offset)
                    if got <= 0:
                        raise CheckpointError(f"{self.file}: tensor {self.name!r} is truncated")
                    offset, view = offset + got, view[got:]
        finally:
            os.close(fd)
        return out


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; returns name → TensorInfo."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size} "
                                  f"(truncated or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    base, data_len = 8 + n, size - 8 - n
    infos, spans = {}, []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            b, e = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {meta!r}") from None
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has a negative dimension {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= b <= e or e - b != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} offsets {b}..{e} do not match "
                                  f"{meta['dtype']}{list(shape)} ({nbytes} bytes)")
        if e > data_len:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {e} but the data section has "
                                  f"{data_len} bytes (file truncated)")
        infos[name] = TensorInfo(path, name, dtype, shape, base + b, base + e)
        spans.append((b, e, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return infos


def find_weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF directory (single or sharded with index)."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: invalid index ({e})") from None
        from medjax.errors import ConfigError
        from medjax.paths import inside
        try:
            files = sorted({inside(d, f, what=f"{index.name} shard") for f in weight_map.values()})
        except ConfigError as e:
            raise CheckpointError(f"{index}: {e}") from None
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that do not exist: {missing}")
        return files
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(d.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(f"{d}: only pickle weights found ({', '.join(pickles)}); medjax never "
                              f"loads pickle. Convert them to safetensors first.")
    raise CheckpointError(f"{d}: no model.safetensors, model.safetensors.index.json or *.safetensors")


def check_weight_map(directory: str | os.PathLike, tensors: dict[str, TensorInfo]) -> None:
    """A sharded directory's ``weight_map`` must name exactly the tensors each shard holds."""
    index = Path(directory) / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map = json.loads(index.read_text())["weight_map"]
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"{Path(directory) / shard}: has no tensor {name!r}, which "
                                  f"{index.name} places there")
        if info.file.name != Path(shard).name:
            raise CheckpointError(f"{info.file}: holds tensor {name!r}, which {index.name} places "
                                  f"in {shard}")
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        raise CheckpointError(f"{tensors[extra[0]].file}: tensor {extra[0]!r} is not in {index.name}")


_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_safetensors(path: str | os.PathLike, tensors, metadata: dict | None = None) -> int:
    """Write ``tensors`` — ``(name, dtype, shape, chunks)`` with ``chunks`` an iterable of arrays
    whose bytes, in order, are the tensor's (C order) — as one safetensors file; returns the
    data bytes. Only the chunk being written is held; an ``OSError`` (ENOSPC...) names ``path``."""
    path, tensors = Path(path), list(tensors)
    header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
    for name, dtype, shape, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, dtype, shape, chunks in tensors:
                want, done = header[name]["data_offsets"], 0
                for chunk in chunks:
                    data = np.ascontiguousarray(chunk, dtype).reshape(-1).view(np.uint8)
                    f.write(data)
                    done += data.nbytes
                if done != want[1] - want[0]:
                    raise ValueError(f"tensor {name!r}: chunks gave {done} bytes, "
                                     f"expected {want[1] - want[0]}")
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    return offset


def index_tensors(files: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file} and {f}")
            tensors[name] = info
    return tensors
