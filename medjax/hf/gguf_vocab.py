"""A medjax ``Tokenizer`` as GGUF ``tokenizer.*`` metadata (the keys llama.cpp reads), and back.

:func:`tokenizer_metadata` writes, :func:`read_tokenizer` reads. Two vocabulary kinds:

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

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from medjax.chat_templates import BUILTIN_CHAT_TEMPLATES
from medjax.errors import CheckpointError
from medjax.tokenizer.core import Tokenizer
from medjax.tokenizer.sentencepiece import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED,
                                           add_typed_special_tokens, sentencepiece_backend)

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
        regexes = [step.get("pattern", {}).get("Regex") for step in _steps(spec.get("pre_tokenizer"))]
        pre = _LLAMA3_PRE if LLAMA3_SPLIT in regexes else "default"
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.add_space_prefix": False,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": _types(tok, tokens, added, "gpt2"),
            "tokenizer.ggml.merges": merges}


# ----------------------------------------------------------------------------- reading
def read_tokenizer(reader, source: str | None = None) -> Tokenizer:
    """The ``Tokenizer`` of a ``gguf.GGUFReader``'s ``tokenizer.*`` metadata."""
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return tokenizer_from_metadata(meta, source or str(getattr(reader, "path", "gguf")))


# Split pattern of Llama-3 style byte-level vocabularies (tiktoken's cl100k form).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {name: LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx")}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def tokenizer_from_metadata(meta: dict, source: str) -> Tokenizer:
    """A ``Tokenizer`` from GGUF ``tokenizer.*`` metadata (the inverse of :func:`tokenizer_metadata`)."""
    def get(key, default=None):
        return meta.get(f"tokenizer.{key}", default)

    kind = get("ggml.model")
    tokens = list(get("ggml.tokens") or [])
    if not tokens:
        raise CheckpointError(f"{source}: no tokenizer.ggml.tokens in the GGUF metadata")
    types = list(get("ggml.token_type") or [NORMAL] * len(tokens))
    merges = get("ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges is not None else None
    add_bos = get("ggml.add_bos_token")
    if kind == "gpt2":
        byte_map = _byte_alphabet()
        alphabet = set(byte_map.values())
        spelled = [t if set(t) <= alphabet else "".join(byte_map[b] for b in t.encode("utf-8")) for t in tokens]
        # no merges key: a bytes-only vocabulary (GGUF cannot store an empty array)
        backend = BackendTokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges or [],
                                              fuse_unk=False, dropout=None))
        split = _GGUF_SPLITS.get(get("ggml.pre"))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        add_typed_special_tokens(backend, tokens, types, alphabet=alphabet)
        add_bos = bool(add_bos) if add_bos is not None else False
    elif kind == "llama":
        scores = list(get("ggml.scores") or [0.0] * len(tokens))
        add_prefix = get("ggml.add_space_prefix")
        backend = sentencepiece_backend(
            tokens, scores, types, kind="bpe", unk_id=get("ggml.unknown_token_id", 0),
            byte_fallback=True, add_prefix_space=True if add_prefix is None else bool(add_prefix), merges=merges)
        add_bos = True if add_bos is None else bool(add_bos)  # llama.cpp's default for this kind
    else:
        raise CheckpointError(f"{source}: GGUF tokenizer.ggml.model {kind!r} is not supported "
                             "(supported: 'gpt2' byte-level BPE, 'llama' sentencepiece BPE)")

    def token(key):
        token_id = get(f"ggml.{key}")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    tok = Tokenizer(backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                    pad_token=token("padding_token_id"), unk_token=token("unknown_token_id"),
                    add_bos_token=add_bos, add_eos_token=bool(get("ggml.add_eos_token", False)),
                    chat_template=get("chat_template"), source=source)
    tok.gguf_pre = get("ggml.pre")  # llama.cpp's pre-tokenizer name, kept for GGUF export
    return tok
