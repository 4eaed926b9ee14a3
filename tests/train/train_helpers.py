"""Tiny HF checkpoints with a byte-level tokenizer and a tiny Alpaca file, built locally."""
import json
from pathlib import Path

VOCAB = 3 + 256          # <pad> <s> </s> + 256 byte symbols


def write_byte_tokenizer(out: Path) -> None:
    from medjax.tokenizer import byte_tokenizer
    byte_tokenizer(add_bos_token=False).save(out)


def make_tiny_model_dir(out: Path, family: str = "llama2", **overrides) -> Path:
    from hf_fixtures import make_tiny_hf
    make_tiny_hf(family, out, vocab_size=VOCAB, pad_token_id=0, **overrides)
    write_byte_tokenizer(out)
    return out


FACTS = [("aspirin", "an antiplatelet drug"), ("insulin", "a pancreatic hormone"),
         ("the femur", "the thigh bone"), ("asthma", "an airway disease"),
         ("the liver", "an abdominal organ"), ("ibuprofen", "an NSAID"),
         ("the heart", "a muscular pump"), ("anaemia", "low haemoglobin")]


def write_alpaca(path: Path, n: int = 48) -> Path:
    rows = []
    for i in range(n):
        name, what = FACTS[i % len(FACTS)]
        rows.append({"instruction": f"What is {name}?", "input": "", "output": f"{name} is {what}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(model_dir, data, out_dir, **over):
    """A RunConfig dict for a few fast steps on the tiny model (fp32, CPU)."""
    from medjax.config import build, RunConfig
    cfg = {
        "model": {"path": str(model_dir), "dtype": "float32", "param_dtype": "float32",
                  "attention": "xla"},
        "data": {"train": str(data), "format": "alpaca", "seq_len": 64, "seed": 0, "heldout_rows": 8},
        "optim": {"lr": 1e-2, "schedule": "constant", "warmup_steps": 0, "clip_norm": 1.0},
        "lora": {"enabled": False},
        "checkpoint": {"every": 0, "keep": 2, "async_save": False},
        "train": {"steps": 10, "batch_size": 4, "out_dir": str(out_dir), "export": []},
    }
    for dotted, value in over.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return build(RunConfig, cfg)
