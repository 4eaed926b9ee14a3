"""Random-weight checkpoints at published full size, written locally and streamed to disk.

    python -m medjax.bench._fullsize_fixture --preset llama2-7b [--layers N] [--out DIR]

``write_fixture`` writes an HF directory like Meta's/Mistral's releases: ``config.json`` from the
medjax preset's ``to_hf_config`` (Llama-2-7B-chat's or Mixtral-8x7B's exact shapes, optionally
fewer layers), bf16 safetensors split at ``max_shard_bytes`` (10 GB, like the releases) into
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, and a locally trained
32000-piece byte-fallback BPE tokenizer with Llama-2's ``<unk> <s> </s>``. Nothing is downloaded.

Each file is streamed by ``hf.safetensors_io.write_safetensors``: the header, then each tensor's
bytes, generated in row chunks of at most ``CHUNK_BYTES`` (numpy RNG seeded per tensor, std 0.02,
norms 1), so the host never holds more than one chunk. A directory is reused when its
``.complete`` marker (written last) records the same arguments; the default place is ``$MEDJAX_FULLSIZE_CACHE``
(else ``~/.cache/medjax/fullsize``)/``<preset>-<layers>l``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from medjax.errors import ConfigError
from medjax.hf.safetensors_io import write_safetensors
from medjax.models.presets import get as get_preset

PRESETS = {"llama2-7b": "llama2-7b", "mixtral-8x7b-2l": "mixtral-8x7b"}
DEFAULT_LAYERS = {"llama2-7b": 32, "mixtral-8x7b-2l": 2}
MAX_SHARD_BYTES = 10 * 10**9          # Meta's Llama-2-7b-hf: two files of 9.98 GB and 3.5 GB
CHUNK_BYTES = 64 * 2**20
INIT_STD = 0.02
MARKER = ".complete"
BF16 = np.dtype(ml_dtypes.bfloat16)


def cache_dir() -> Path:
    return Path(os.environ.get("MEDJAX_FULLSIZE_CACHE") or Path.home() / ".cache" / "medjax" / "fullsize")


def model_config(preset: str, layers: int | None = None):
    """The medjax ModelConfig of ``preset`` (a key of PRESETS) with ``layers`` layers."""
    cfg = get_preset(PRESETS[preset])
    return cfg.replace(num_layers=layers or DEFAULT_LAYERS[preset])


def hf_tensors(cfg) -> list[tuple[str, tuple]]:
    """(HF name, shape) of every tensor of the checkpoint, in the releases' order."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (q, H)), (p + "self_attn.k_proj.weight", (kv, H)),
                (p + "self_attn.v_proj.weight", (kv, H)), (p + "self_attn.o_proj.weight", (H, q))]
        if cfg.is_moe:
            out.append((p + "block_sparse_moe.gate.weight", (cfg.num_experts, H)))
            for e in range(cfg.num_experts):
                x = f"{p}block_sparse_moe.experts.{e}."
                out += [(x + "w1.weight", (I, H)), (x + "w2.weight", (H, I)), (x + "w3.weight", (I, H))]
        else:
            out += [(p + "mlp.gate_proj.weight", (I, H)), (p + "mlp.up_proj.weight", (I, H)),
                    (p + "mlp.down_proj.weight", (H, I))]
    out += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    return out


def plan_shards(tensors, max_shard_bytes: int) -> list[list[tuple[str, tuple]]]:
    """Tensors grouped in order into files of at most ``max_shard_bytes`` (one tensor at least)."""
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * BF16.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _chunks(name: str, shape: tuple, seed: int, index: int):
    """The tensor's values in row chunks of at most ``CHUNK_BYTES`` (fp32 before the bf16 cast)."""
    if name.endswith("norm.weight"):
        yield np.ones(shape, BF16)
        return
    rng = np.random.default_rng([seed, index])
    rows, width = shape[0], math.prod(shape[1:])
    step = max(1, CHUNK_BYTES // (4 * width))
    for r0 in range(0, rows, step):
        chunk = rng.standard_normal((min(step, rows - r0), width), dtype=np.float32)
        chunk *= INIT_STD
        yield chunk.astype(BF16)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-fallback BPE (``tokenizers``) trained on the bundled instruction text, its vocabulary
    padded with unreachable pieces to exactly ``vocab_size`` ids; Llama-2's special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from importlib.resources import files
    text = files("medjax").joinpath("assets/med_instruct.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    corpus = [" ".join(str(v) for v in r.values()) for r in records]
    specials = ["<unk>", "<s>", "</s>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials + bytes_, show_progress=False))
    spec = json.loads(tok.to_str())
    vocab, n = spec["model"]["vocab"], len(spec["model"]["vocab"])
    vocab.update({f"<pad_{i}>": i for i in range(n, vocab_size)})
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 4096, "legacy": False}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))


def write_fixture(preset: str = "llama2-7b", layers: int | None = None, out=None, *, seed: int = 0,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write (or reuse, when complete with the same arguments) the checkpoint; returns its path."""
    cfg = model_config(preset, layers)
    out = Path(out) if out else cache_dir() / f"{preset}-{cfg.num_layers}l"
    stamp = {"preset": preset, "layers": cfg.num_layers, "seed": seed, "max_shard_bytes": max_shard_bytes}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise ConfigError(f"{out} exists and is not a fixture this command wrote (no {MARKER}): "
                          f"it is left alone; name another --out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tensors = hf_tensors(cfg)
    order = {name: i for i, (name, _) in enumerate(tensors)}
    shards = plan_shards(tensors, max_shard_bytes)
    n = len(shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
    weight_map, total = {}, 0
    for file, entries in zip(names, shards):
        total += write_safetensors(out / file, [(name, BF16, shape, _chunks(name, shape, seed, order[name]))
                                                for name, shape in entries])
        weight_map.update({name: file for name, _ in entries})
    if n > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg.to_hf_config("bfloat16"), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}))
    write_tokenizer(out, cfg.vocab_size)
    marker.write_text(json.dumps(stamp))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medjax.bench._fullsize_fixture",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-bytes", type=int, default=MAX_SHARD_BYTES)
    args = ap.parse_args(argv)
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out}: its parent directory does not exist")
    print(write_fixture(args.preset, args.layers, args.out, seed=args.seed,
                        max_shard_bytes=args.max_shard_bytes))
    return 0


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
