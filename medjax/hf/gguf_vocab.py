"""A medjax ``Tokenizer`` as GGUF ``tokenizer.*`` metadata (the keys llama.cpp reads).

Two vocabulary kinds, the two ``Tokenizer.from_gguf`` reads back:

* ``llama`` (sentencepiece BPE with byte fallback): tokens + scores + token types. From a
  ``tokenizer.model`` the pieces, scores and types are the protobuf's own. From a
  ``tokenizer.json`` BPE there are no scores: a merge's result gets ``-rank`` (llama.cpp's SPM
  merges the pair whose result scores highest, i.e. the earliest merge), and the merges are
  stored too so that the importer rebuilds the exact BPE.
* ``gpt2`` (byte-level BPE): tokens as the byte-level alphabet spells them + ``"a b"`` merges.

Token types follow llama.cpp's converter: added special tokens are CONTROL, other added tokens
USER_DEFINED, the unknown token (when not an added one) UNKNOWN, ``<0xNN>`` pieces BYTE. A tokenizer smaller than the model's embedding is padded
with ``[PAD{i}]`` UNUSED tokens (as llama.cpp's converter does) so that ``n_vocab`` matches.
"""
from __future__ import annotations

import json
import re

from medjax.chat_templates import BUILTIN_CHAT_TEMPLATES
from medjax.errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# tokenizer.ggml.pre names whose split regex the importer knows (Llama-3's).
_LLAMA3_PRE = "llama-bpe"


def tokenizer_metadata(tok, vocab_size: int) -> dict:
    """``{gguf key: value}`` for ``tok``, padded to ``vocab_size`` tokens."""
    if tok.sentencepiece_model is not None:
        meta = _from_sentencepiece(tok.sentencepiece_model)
    else:
        meta = _from_backend(tok)
    tokens = meta["tokenizer.ggml.tokens"]
    if len(tokens) > vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokens)} tokens but the model's embedding has "
                              f"only {vocab_size} rows")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        meta["tokenizer.ggml.token_type"].append(UNUSED)
        if "tokenizer.ggml.scores" in meta:
            meta["tokenizer.ggml.scores"].append(-1000.0)
    for key, token in (("bos_token_id", tok.bos_token), ("eos_token_id", tok.eos_token),
                       ("unknown_token_id", tok.unk_token), ("padding_token_id", tok.pad_token)):
        if token is not None:
            meta[f"tokenizer.ggml.{key}"] = tok.token_to_id(token)
    meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos_token)
    if tok.add_eos_token:  # llama.cpp's default is false
        meta["tokenizer.ggml.add_eos_token"] = True
    if tok.chat_template is not None:
        meta["tokenizer.chat_template"] = BUILTIN_CHAT_TEMPLATES.get(tok.chat_template, tok.chat_template)
    return meta


def _from_sentencepiece(model_bytes: bytes) -> dict:
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    if proto.trainer_spec.model_type != 2:
        raise CheckpointError("GGUF export supports sentencepiece BPE vocabularies only "
                              f"(this one has model_type {proto.trainer_spec.model_type})")
    return {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
            "tokenizer.ggml.scores": [float(p.score) for p in proto.pieces],
            "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
            "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
            "tokenizer.ggml.remove_extra_whitespaces": bool(proto.normalizer_spec.remove_extra_whitespaces)}


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _types(tok, tokens: list[str], added: dict, kind: str) -> list[int]:
    types = []
    for i, t in enumerate(tokens):
        if i in added:
            types.append(CONTROL if added[i]["special"] else USER_DEFINED)
        elif t == tok.unk_token:
            types.append(UNKNOWN)
        elif kind == "llama" and _BYTE_PIECE.fullmatch(t):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return types


def _steps(component) -> list[dict]:
    """A normalizer/pre-tokenizer JSON and, for a Sequence, its members."""
    if not component:
        return []
    inner = component.get("normalizers") or component.get("pretokenizers") or []
    return [component] + [s for step in inner for s in _steps(step)]


def _from_backend(tok) -> dict:
    spec = json.loads(tok.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise CheckpointError(f"GGUF export supports BPE tokenizers only (this one is {model.get('type')})")
    n = tok.backend.get_vocab_size(with_added_tokens=True)
    tokens = [tok.backend.id_to_token(i) for i in range(n)]
    if any(t is None for t in tokens):
        raise CheckpointError(f"the tokenizer's ids are not contiguous (id {tokens.index(None)} has no token)")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    merges = _merges(model)
    if model.get("byte_fallback"):
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        prefix = any(step.get("type") == "Prepend" for step in _steps(spec.get("normalizer"))) or any(
            step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never"
            for step in _steps(spec.get("pre_tokenizer")))
        return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": [-float(rank[t]) if t in rank else 0.0 for t in tokens],
                "tokenizer.ggml.token_type": _types(tok, tokens, added, "llama"),
                "tokenizer.ggml.merges": merges,
                "tokenizer.ggml.add_space_prefix": prefix}
    pre = getattr(tok, "gguf_pre", None)
    if pre is None:
        from medjax.tokenizer import _LLAMA3_SPLIT
        regexes = [step.get("pattern", {}).get("Regex") for step in _steps(spec.get("pre_tokenizer"))]
        pre = _LLAMA3_PRE if _LLAMA3_SPLIT in regexes else "default"
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.add_space_prefix": False,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": _types(tok, tokens, added, "gpt2"),
            "tokenizer.ggml.merges": merges}
