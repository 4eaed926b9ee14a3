"""``--dtype auto``: the dtype lm-eval's ``--model hf --model_args dtype=auto`` would use.

lm-eval passes ``dtype=auto`` to transformers, which takes the checkpoint's own dtype:
- an HF directory: ``dtype`` (transformers 5) or ``torch_dtype`` from config.json; without
  either, the dtype of the first floating-point tensor in its safetensors files;
- a GGUF file: bfloat16 when any tensor is quantized (Q4_1, Q8_0, ...: their dequantized
  values are not a float type of their own), else the file's float type (BF16, F16, F32);
- a run checkpoint (``<run>/checkpoints`` or the run directory): the run's ``model.dtype``,
  which ``medjax.load`` rebuilds it with (see ``__main__``).
"""
from __future__ import annotations

from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def _float_name(dtype) -> str | None:
    name = str(dtype)
    return name if name in DTYPES else None


def hf_dtype(directory: Path) -> tuple[str, str]:
    import json

    from medjax.errors import CheckpointError
    from medjax.hf.safetensors_io import find_weight_files, read_header
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value is not None:
            name = _float_name(str(value).removeprefix("torch."))
            if name is None:
                raise CheckpointError(f"{directory / 'config.json'}: {key} = {value!r} is not one of {DTYPES}")
            return name, f"config.json {key}"
    for file in find_weight_files(directory):
        for info in read_header(file).values():
            name = _float_name(info.dtype)
            if name is not None:
                return name, f"{file.name} tensor {info.name!r} (config.json has no dtype)"
    return "float32", "no floating-point tensor found"


def gguf_dtype(path: Path) -> tuple[str, str]:
    import gguf
    T = gguf.GGMLQuantizationType
    floats = {T.F32: "float32", T.F16: "float16", T.BF16: "bfloat16", T.F64: "float32"}
    ints = {T.I8, T.I16, T.I32, T.I64}
    types = {t.tensor_type for t in gguf.GGUFReader(path, "r").tensors}
    quantized = sorted(t.name for t in types - set(floats) - ints)
    if quantized:
        return "bfloat16", f"quantized GGUF ({', '.join(quantized)})"
    for t in (T.BF16, T.F16, T.F32, T.F64):   # half-precision weights beside F32 norms: half
        if t in types:
            return floats[t], f"GGUF float type {t.name}"
    return "float32", "GGUF without float tensors"


def auto_dtype(path: Path) -> tuple[str, str]:
    """``(dtype name, why)`` for an HF directory or a GGUF file."""
    if not Path(path).exists():
        from medjax.errors import CheckpointError
        raise CheckpointError(f"{path}: no such file or directory")   # as medjax.load says it
    from medjax.hf.pretrained import is_gguf
    return gguf_dtype(path) if is_gguf(Path(path)) else hf_dtype(path)
