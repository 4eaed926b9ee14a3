"""The bad inputs, one builder per case: ``build(ctx) -> Call`` writes the bad file(s) under ``ctx.tmp``.

A ``Call`` names the real CLI (``train``, ``eval``, ``export``, ``data``) and its argv, or a Python
API call (``api``), the substrings the one-line error must contain (the culprit: file:line, key,
tensor), and the output paths that must not appear (no partial output).
"""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from reliability_helpers import tiny_run_config


@dataclass
class Call:
    cli: str                                  # train | eval | export | data | generate | api
    argv: list = field(default_factory=list)
    expect: tuple = ()                        # substrings of the error line
    outputs: tuple = ()                       # paths that must hold no file afterwards
    api: Callable | None = None               # for cli == "api"


@dataclass
class Ctx:
    tmp: Path
    model_dir: Path                           # a good tiny HF model with tokenizer
    text_data: Path                           # good text-format JSONL


# ------------------------------------------------------------------------------ helpers
def _train(ctx, *overrides, data=None, model=None, raw_yaml=None, **sections) -> Call:
    out = ctx.tmp / "run"
    cfg_path = ctx.tmp / "run.yaml"
    if raw_yaml is not None:
        cfg_path.write_text(raw_yaml)
    else:
        cfg = tiny_run_config(model or ctx.model_dir, data or ctx.text_data, out, steps=2, export=(),
                              **sections)
        cfg_path.write_text(yaml.safe_dump(cfg))
    return Call("train", ["--config", str(cfg_path), "--no-progress", *overrides], outputs=(out,))


def _data(ctx, path: Path, fmt: str, *overrides) -> Call:
    cfg = tiny_run_config(ctx.model_dir, path, ctx.tmp / "run")
    cfg["data"].update(format=fmt, seq_len=64, heldout_rows=0)   # inspect every row of the file
    cfg_path = ctx.tmp / "data.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    return Call("data", ["inspect", "--config", str(cfg_path), "--tokenizer", str(ctx.model_dir),
                         "--no-color", "--examples", "1", "--batches", "1", *overrides])


def _lines(path: Path, *lines) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def _row(text="aspirin is an antiplatelet drug."):
    return json.dumps({"text": text})


def _alpaca(**kw):
    row = {"instruction": "What is aspirin?", "input": "", "output": "An antiplatelet drug."}
    row.update(kw)
    return json.dumps({k: v for k, v in row.items() if v is not None})


def _copy_model(ctx, name="model") -> Path:
    d = ctx.tmp / name
    shutil.copytree(ctx.model_dir, d)
    return d


def _mutate_tensors(ctx, mutate) -> Path:
    from safetensors.numpy import load_file, save_file
    d = _copy_model(ctx)
    tensors = load_file(str(d / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(d / "model.safetensors"))
    return d


def _raw_safetensors(ctx, header: dict | bytes, data: bytes = b"", header_len=None) -> Path:
    d = _copy_model(ctx)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    (d / "model.safetensors").write_bytes(struct.pack("<Q", n) + raw + data)
    return d


def _weights(ctx, model_dir, *expect) -> Call:
    call = _train(ctx, model=model_dir)
    call.expect = expect
    return call


def _generate(ctx, model_dir, *expect) -> Call:
    return Call("generate", ["--model", str(model_dir), "--prompt", "Which drug?"], expect=expect)


def generate_cases():
    """The three checkpoints issue 30 saw end in a traceback from ``python -m medjax.generate``."""
    def c(name, expect, build):
        return (f"generate-{name}", expect, build)

    def truncated(x):
        d = _copy_model(x)
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:-1000])
        return _generate(x, d)

    def pickle_only(x):
        d = _copy_model(x)
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
        return _generate(x, d)

    huge = {"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 16]}}   # 2^42 bytes claimed
    return [
        c("truncated-safetensors", ("model.safetensors", "truncated"), truncated),
        c("pickle-only-dir", ("only pickle weights", "pytorch_model.bin"), pickle_only),
        c("header-claims-2-to-the-42-byte-tensor", ("tensor 'w'",),
          lambda x: _generate(x, _raw_safetensors(x, huge, b"\0" * 16))),
    ]


def _eval_dir(ctx, *lines) -> Path:
    d = ctx.tmp / "bench"
    d.mkdir(exist_ok=True)
    _lines(d / "medqa_usmle_4options_test.jsonl", *lines)
    return d


def _medqa(options=("a", "b", "c", "d"), answer="A", drop=None):
    rec = {"question": "Which drug?", "options": dict(zip("ABCDE", options)), "answer_idx": answer}
    if drop:
        rec.pop(drop)
    return json.dumps(rec)


def _eval(ctx, data_dir, tasks="medqa", model=None) -> Call:
    out = ctx.tmp / "results.json"
    return Call("eval", ["--model", str(model or ctx.model_dir), "--data-dir", str(data_dir),
                         "--tasks", tasks, "--output", str(out)], outputs=(out,))


# ------------------------------------------------------------------------------ cases
def config_cases():
    def c(name, expect, build):
        return (f"config-{name}", expect, build)
    return [
        c("unknown-section", ("'trian'", "did you mean 'train'"),
          lambda x: _train(x, raw_yaml=yaml.safe_dump({"model": {"preset": "tiny-llama"}, "trian": {}}))),
        c("unknown-key", ("'optim.learning_rate'",), lambda x: _train(x, "optim.learning_rate=0.001")),
        c("wrong-type", ("train.steps", "expected int", "'ten'"), lambda x: _train(x, "train.steps=ten")),
        c("negative-lr", ("optim.lr must be > 0",), lambda x: _train(x, "optim.lr=-0.001")),
        c("bool-wrong-type", ("lora.enabled", "expected bool"), lambda x: _train(x, "lora.enabled=maybe")),
        c("bad-choice", ("data.format", "'csv'"), lambda x: _train(x, "data.format=csv")),
        c("batch-not-divisible", ("train.grad_accum",), lambda x: _train(x, "train.grad_accum=3")),
        c("negative-checkpoint-every", ("checkpoint.every",), lambda x: _train(x, "checkpoint.every=-1")),
        c("invalid-yaml", ("invalid YAML",), lambda x: _train(x, raw_yaml="model: [unclosed\n")),
        c("missing-config-file", ("config file not found", "nope.yaml"),
          lambda x: Call("train", ["--config", str(x.tmp / "nope.yaml")])),
        c("override-without-equals", ("'train.steps'", "key.sub=value"), lambda x: _train(x, "train.steps")),
        c("mesh-not-matching-devices", ("mesh",), lambda x: _train(x, "mesh.data=3")),
        c("lora-target-matches-nothing", ("lora.targets", "nothing_proj"),
          lambda x: _train(x, "lora.enabled=true", "lora.targets=[nothing_proj]")),
    ]


def data_cases():
    def c(name, expect, build):
        return (f"data-{name}", expect, build)

    def f(x, name):
        return x.tmp / name
    return [
        # the training loop's reader (python -m medjax.train)
        c("train-malformed-json-line", ("bad.jsonl:3", "invalid JSON"),
          lambda x: _train(x, data=_lines(f(x, "bad.jsonl"), _row(), _row(), '{"text": "unclosed'))),
        c("train-missing-field", ("bad.jsonl:2", "'text'"),
          lambda x: _train(x, data=_lines(f(x, "bad.jsonl"), _row(), json.dumps({"txt": "x"}), *[_row()] * 12))),
        c("train-empty-file", ("empty.jsonl", "empty"), lambda x: _train(x, data=_lines(f(x, "empty.jsonl")))),
        c("train-non-utf8", ("bad.jsonl:2", "not UTF-8"),
          lambda x: _train(x, data=_lines(f(x, "bad.jsonl"), _row(), b'{"text": "caf\xe9"}'))),
        c("train-missing-file", ("no data files match", "absent.jsonl"),
          lambda x: _train(x, data=f(x, "absent.jsonl"))),
        # the medjax.data pipeline (python -m medjax.data inspect)
        c("pipeline-malformed-json-line", ("bad.jsonl:3", "invalid JSON"),
          lambda x: _data(x, _lines(f(x, "bad.jsonl"), _alpaca(), _alpaca(), "{oops"), "alpaca")),
        c("pipeline-missing-field", ("bad.jsonl:2", "'output'"),
          lambda x: _data(x, _lines(f(x, "bad.jsonl"), _alpaca(), _alpaca(output=None)), "alpaca")),
        c("pipeline-field-wrong-type", ("bad.jsonl:1", "'output'", "str"),
          lambda x: _data(x, _lines(f(x, "bad.jsonl"), json.dumps({"instruction": "q", "output": 5})), "alpaca")),
        c("pipeline-empty-file", ("empty.jsonl",), lambda x: _data(x, _lines(f(x, "empty.jsonl")), "alpaca")),
        c("pipeline-non-utf8", ("bad.jsonl:2", "not UTF-8"),
          lambda x: _data(x, _lines(f(x, "bad.jsonl"), _alpaca(), b'{"instruction": "caf\xe9"}'), "alpaca")),
        c("pipeline-longer-than-seq-no-truncation", ("seq_len",),
          lambda x: _data(x, _lines(f(x, "long.jsonl"), *[_row("x" * 500)] * 4), "text",
                          "data.long_examples=drop")),
        c("pipeline-chat-unknown-role", ("chat.jsonl:1", "unknown role 'doctor'"),
          lambda x: _data(x, _lines(f(x, "chat.jsonl"), json.dumps({"messages": [
              {"role": "doctor", "content": "hi"}, {"role": "assistant", "content": "hello"}]})), "chat")),
        c("pipeline-chat-no-assistant", ("chat.jsonl:1", "no assistant turn"),
          lambda x: _data(x, _lines(f(x, "chat.jsonl"), json.dumps({"messages": [
              {"role": "user", "content": "hi"}]})), "chat")),
        c("pipeline-not-an-object", ("bad.jsonl:1", "expected a JSON object"),
          lambda x: _data(x, _lines(f(x, "bad.jsonl"), "[1, 2]"), "alpaca")),
        c("pipeline-unsupported-file-type", ("data.csv", "unsupported file type"),
          lambda x: _data(x, _lines(f(x, "data.csv"), "a,b"), "alpaca")),
        c("pipeline-missing-file", ("absent.jsonl",), lambda x: _data(x, f(x, "absent.jsonl"), "alpaca")),
    ]


def weight_cases():
    def c(name, expect, build):
        return (f"weights-{name}", expect, build)
    K = "model.layers.0.self_attn.k_proj.weight"

    def truncated(x):
        d = _copy_model(x)
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:-1000])
        return _weights(x, d)

    def unsupported_hf(x):
        d = _copy_model(x)
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
        (d / "config.json").write_text(json.dumps(cfg))
        return _weights(x, d)

    def index(x, shard):
        d = _copy_model(x)
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {K: shard}}))
        return _weights(x, d)

    def two_shards(x, mutate):
        """The tiny model split like an HF release (two files + a complete index); ``mutate``
        then breaks the directory."""
        from safetensors.numpy import load_file, save_file
        d = _copy_model(x)
        tensors = load_file(str(d / "model.safetensors"))
        (d / "model.safetensors").unlink()
        names = sorted(tensors)
        files = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
                 "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file, part in files.items():
            save_file({n: tensors[n] for n in part}, str(d / file))
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {n: f for f, part in files.items() for n in part}}
        mutate(d, index)
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        return _weights(x, d)

    def shard_gone(d, index):
        (d / "model-00002-of-00002.safetensors").unlink()

    def index_names_absent(d, index):
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00002-of-00002.safetensors"

    def index_wrong_shard(d, index):
        index["weight_map"][K] = next(f for f in set(index["weight_map"].values())
                                      if f != index["weight_map"][K])

    def pickle_only(x):
        d = _copy_model(x)
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
        return _weights(x, d)

    def no_config(x):
        d = _copy_model(x)
        (d / "config.json").unlink()
        return _weights(x, d)

    def bad_config(x):
        d = _copy_model(x)
        (d / "config.json").write_text("{not json")
        return _weights(x, d)

    def gguf_gpt2(x):
        import gguf
        path = x.tmp / "gpt2.gguf"
        w = gguf.GGUFWriter(str(path), arch="gpt2")
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return _weights(x, path)

    return [
        c("truncated-safetensors", ("model.safetensors", "truncated"), truncated),
        c("shape-mismatch", (K, "shape [5, 64]"),
          lambda x: _weights(x, _mutate_tensors(x, lambda t: t.update({K: np.zeros((5, 64), np.float32)})))),
        c("dtype-mismatch", (K, "dtype int32"),
          lambda x: _weights(x, _mutate_tensors(x, lambda t: t.update({K: t[K].astype(np.int32)})))),
        c("missing-tensor", ("missing tensor", "'model.layers.1.mlp.up_proj.weight'"),
          lambda x: _weights(x, _mutate_tensors(x, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")))),
        c("unexpected-tensor", ("unexpected tensor", "'model.layers.0.extra.weight'"),
          lambda x: _weights(x, _mutate_tensors(x, lambda t: t.update(
              {"model.layers.0.extra.weight": np.zeros(3, np.float32)})))),
        c("header-claims-huge-length", ("model.safetensors", "header claims"),
          lambda x: _weights(x, _raw_safetensors(x, b"{}", header_len=1 << 62))),
        c("header-claims-huge-tensor", ("tensor 'w'", "do not match"),
          lambda x: _weights(x, _raw_safetensors(x, {"w": {"dtype": "F32", "shape": [1 << 40, 1 << 20],
                                                            "data_offsets": [0, 16]}}, b"\0" * 16))),
        c("offsets-outside-file", ("tensor 'w'", "ends at byte"),
          lambda x: _weights(x, _raw_safetensors(x, {"w": {"dtype": "F32", "shape": [1024],
                                                            "data_offsets": [0, 4096]}}, b"\0" * 16))),
        c("overlapping-tensors", ("'a'", "'b'", "overlap"),
          lambda x: _weights(x, _raw_safetensors(x, {
              "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24))),
        c("header-not-json", ("model.safetensors", "not valid JSON"),
          lambda x: _weights(x, _raw_safetensors(x, b"{oops"))),
        c("unknown-dtype", ("tensor 'w'", "malformed header entry"),
          lambda x: _weights(x, _raw_safetensors(x, {"w": {"dtype": "F7", "shape": [1],
                                                            "data_offsets": [0, 4]}}, b"\0" * 4))),
        c("pickle-only-dir", ("only pickle weights", "pytorch_model.bin"), pickle_only),
        c("gguf-unsupported-architecture", ("GGUF architecture 'gpt2'",), gguf_gpt2),
        c("unsupported-hf-architecture", ("GPT2LMHeadModel",), unsupported_hf),
        c("no-config-json", ("no config.json",), no_config),
        c("config-json-invalid", ("config.json", "invalid JSON"), bad_config),
        c("index-shard-escapes-dir", ("escapes",), lambda x: index(x, "../../outside.safetensors")),
        c("index-shard-missing", ("do not exist", "gone.safetensors"), lambda x: index(x, "gone.safetensors")),
        c("model-path-missing", ("no such file or directory", "absent_model"),
          lambda x: _weights(x, x.tmp / "absent_model")),
        c("sharded-shard-missing", ("model-00002-of-00002.safetensors", "do not exist"),
          lambda x: two_shards(x, shard_gone)),
        c("sharded-index-names-absent-tensor", ("model-00002-of-00002.safetensors",
                                                "'model.layers.9.mlp.up_proj.weight'"),
          lambda x: two_shards(x, index_names_absent)),
        c("sharded-tensor-in-other-shard", ("model-0000", K, "places"),
          lambda x: two_shards(x, index_wrong_shard)),
    ]


def eval_cases():
    def c(name, expect, build):
        return (f"eval-{name}", expect, build)
    return [
        c("unknown-task", ("unknown task 'medqa5'",), lambda x: _eval(x, _eval_dir(x, _medqa()), "medqa5")),
        c("three-options-where-four-expected", ("medqa_usmle_4options_test.jsonl:2", "3 options, expected 4"),
          lambda x: _eval(x, _eval_dir(x, _medqa(), _medqa(options=("a", "b", "c"))))),
        c("malformed-json-line", ("medqa_usmle_4options_test.jsonl:1", "invalid JSON"),
          lambda x: _eval(x, _eval_dir(x, "{oops"))),
        c("missing-field", ("medqa_usmle_4options_test.jsonl:1", "answer_idx"),
          lambda x: _eval(x, _eval_dir(x, _medqa(drop="answer_idx")))),
        c("answer-out-of-range", ("medqa_usmle_4options_test.jsonl:1", "'F'"),
          lambda x: _eval(x, _eval_dir(x, _medqa(answer="F")))),
        c("data-dir-missing", ("--data-dir", "no_bench"), lambda x: _eval(x, x.tmp / "no_bench")),
        c("model-path-missing", ("no such file or directory", "absent_model"),
          lambda x: _eval(x, _eval_dir(x, _medqa()), model=x.tmp / "absent_model")),
    ]


def cli_cases():
    def c(name, expect, build):
        return (f"cli-{name}", expect, build)

    def export_into_checkpoint(x):
        ckpt = x.tmp / "run" / "checkpoints"
        ckpt.mkdir(parents=True)
        return Call("export", ["--checkpoint", str(ckpt), "--out", str(ckpt)])

    def save_into_source(x):
        import medjax
        d = _copy_model(x, "src_model")

        def call():
            model, tok = medjax.load(d, progress=False)
            medjax.save_hf(model, d, tokenizer=tok, overwrite=True)
        return Call("api", api=call)

    def disk_full_during_export(x):
        """A real ENOSPC: the export's shard writes go to /dev/full (the kernel's always-full
        device); the error must name the shard and leave nothing under the export's parent."""
        import medjax
        import medjax.hf.safetensors_io as S
        out = x.tmp / "exports" / "hf"

        def call():
            model, tok = medjax.load(x.model_dir, progress=False)
            real_open = open

            def full_disk_open(path, mode="r", *a, **kw):
                return real_open("/dev/full" if "w" in mode else path, mode, *a, **kw)
            S.open = full_disk_open
            try:
                medjax.save_hf(model, out, tokenizer=tok)
            finally:
                del S.open
        return Call("api", api=call, expect=("No space left on device", "model-00001.safetensors"),
                    outputs=(x.tmp / "exports",))

    return [
        c("export-disk-full", (), disk_full_during_export),
        c("export-checkpoint-missing", ("no such checkpoint directory", "no_run"),
          lambda x: Call("export", ["--checkpoint", str(x.tmp / "no_run"), "--out", str(x.tmp / "out")],
                         outputs=(x.tmp / "out",))),
        c("export-out-is-input", ("overlaps the input",), export_into_checkpoint),
        c("save-hf-into-its-source", ("refusing to export into", "src_model"), save_into_source),
        c("data-tokenizer-missing", ("no_tok",),
          lambda x: Call("data", ["inspect", "--config", str(_write_cfg(x)), "--tokenizer",
                                  str(x.tmp / "no_tok")])),
    ]


def _write_cfg(x) -> Path:
    p = x.tmp / "ok.yaml"
    p.write_text(yaml.safe_dump(tiny_run_config(x.model_dir, x.text_data, x.tmp / "run")))
    return p


ALL_CASES = (config_cases() + data_cases() + weight_cases() + generate_cases() + eval_cases()
             + cli_cases())
# run as real subprocesses too (python -m medjax.X): the end-to-end path, incl. the interpreter exit
SUBPROCESS_CASES = ("config-unknown-key", "generate-truncated-safetensors", "eval-unknown-task",
                    "data-pipeline-chat-unknown-role")
