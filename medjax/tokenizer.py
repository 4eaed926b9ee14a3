"""One tokenizer interface over HF ``tokenizer.json``, sentencepiece ``tokenizer.model`` and GGUF.

Every source is turned into a ``tokenizers.Tokenizer`` (the Rust library HF uses), so encoding,
special-token splitting and offsets behave the same whatever the file was:

* ``tokenizer.json`` is loaded as is.
* ``tokenizer.model`` (sentencepiece protobuf) is converted the way ``transformers`` converts
  Llama/Mistral models: BPE pieces with byte fallback, merges recovered from the piece scores
  (a merge ranks by the score of the piece it produces), ``Metaspace`` pre-tokenizer.
  Unigram models become a ``tokenizers`` Unigram model with the same scores.
* GGUF metadata (``tokenizer.ggml.*``): ``gpt2`` → byte-level BPE from tokens + merges,
  ``llama`` → the sentencepiece BPE above from tokens + scores (+ merges when stored).

Special tokens (BOS/EOS/PAD, ``add_bos_token``/``add_eos_token``, chat template) come from
``tokenizer_config.json`` / ``special_tokens_map.json`` / ``chat_template.jinja`` or the GGUF keys.
``encode(text, add_special_tokens=True)`` adds BOS/EOS as those flags say (HF's behaviour);
chat templates render in jinja2's sandbox with HF's conventions (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``). Built-in named templates cover models
that ship none: see ``BUILTIN_CHAT_TEMPLATES``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from medjax.chat_templates import BUILTIN_CHAT_TEMPLATES, TURN_END_TOKENS, sandbox
from medjax.errors import CheckpointError
from medjax.outputs import write_file
from medjax.paths import resolve_path




# ----------------------------------------------------------------------------- the interface
class Tokenizer:
    """Text ↔ token ids plus the special tokens and chat template of one model."""

    def __init__(self, backend: BackendTokenizer, *, bos_token=None, eos_token=None, pad_token=None,
                 unk_token=None, add_bos_token=False, add_eos_token=False, chat_template=None,
                 sentencepiece_model: bytes | None = None, source: str = "<memory>"):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
        self.chat_template = chat_template
        self.sentencepiece_model = sentencepiece_model
        self.source = source
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, name)
            if token is not None and backend.token_to_id(token) is None:
                raise CheckpointError(f"{source}: {name} {token!r} is not in the vocabulary")
        if self.add_bos_token and bos_token is None:
            raise CheckpointError(f"{source}: add_bos_token is set but there is no bos_token")
        self._env = None

    # ---- ids
    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """The pad token's id; models without one pad with EOS (then 0)."""
        for token in (self.pad_token, self.eos_token):
            if token is not None:
                return self.backend.token_to_id(token)
        return 0

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """EOS plus every turn-ending token (``<|eot_id|>``, ``<|im_end|>``...) in the vocabulary."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        ids.update(i for i in map(self.backend.token_to_id, TURN_END_TOKENS) if i is not None)
        return tuple(sorted(ids))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- text
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._wrap(ids) if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids) if add_special_tokens else e.ids for e in encodings]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids (no special tokens added) and each token's ``(start, end)`` character span."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """``encode_with_offsets`` for many texts in one backend call (the Rust library spreads it
        over its thread pool; ``RAYON_NUM_THREADS`` caps it)."""
        return [(enc.ids, enc.offsets) for enc in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def _wrap(self, ids: list[int]) -> list[int]:
        if self.add_bos_token:
            ids = [self.bos_id] + ids
        if self.add_eos_token and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        """Render ``messages`` with ``chat_template`` (a jinja string or a built-in name), else the
        model's own template."""
        template = chat_template or self.chat_template
        if template is None:
            raise CheckpointError(
                f"{self.source}: the tokenizer has no chat template; pick a built-in one "
                f"({', '.join(BUILTIN_CHAT_TEMPLATES)}) or give a jinja string")
        template = BUILTIN_CHAT_TEMPLATES.get(template, template)
        if self._env is None:
            self._env = sandbox(CheckpointError)
        variables = dict(bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                         pad_token=self.pad_token or "", unk_token=self.unk_token or "")
        variables.update(kwargs)
        from jinja2 import TemplateError
        try:
            return self._env.from_string(template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError as e:  # syntax, undefined names, the sandbox refusing an attribute
            raise CheckpointError(f"{self.source}: chat template: {e}") from e

    # ---- files
    def save(self, out_dir) -> Path:
        """Write tokenizer.json (+ tokenizer.model for sentencepiece), tokenizer_config.json and
        special_tokens_map.json so that ``transformers.AutoTokenizer.from_pretrained`` loads them."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        backend = BackendTokenizer.from_str(self.backend.to_str())
        backend.post_processor = self._post_processor()
        write_file(out / "tokenizer.json", backend.to_str(pretty=True))
        if self.sentencepiece_model is not None:
            write_file(out / "tokenizer.model", self.sentencepiece_model)
        specials = {k: getattr(self, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                    if getattr(self, k) is not None}
        config = dict(specials, tokenizer_class="PreTrainedTokenizerFast",
                      add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token,
                      clean_up_tokenization_spaces=False, model_max_length=1 << 30)
        if self.chat_template is not None:
            config["chat_template"] = BUILTIN_CHAT_TEMPLATES.get(self.chat_template, self.chat_template)
        write_file(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        write_file(out / "special_tokens_map.json", json.dumps(specials, indent=2, ensure_ascii=False))
        return out

    def _post_processor(self):
        single, pair, specials = "$A", "$A $B", []
        if self.add_bos_token:
            single, pair = f"{self.bos_token} {single}", f"{self.bos_token} $A {self.bos_token} $B"
            specials.append((self.bos_token, self.bos_id))
        if self.add_eos_token and self.eos_token is not None:
            single, pair = f"{single} {self.eos_token}", f"{pair} {self.eos_token}"
            specials.append((self.eos_token, self.eos_id))
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(specials)))

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        """Build from a ``gguf.GGUFReader``'s ``tokenizer.*`` metadata."""
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
        return _from_gguf_metadata(meta, source=str(getattr(reader, "path", "gguf")))

    def __repr__(self):
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, add_bos={self.add_bos_token})")


# ----------------------------------------------------------------------------- loading files
def load_tokenizer(path) -> Tokenizer:
    """Load from an HF model directory, a ``tokenizer.json``, a ``tokenizer.model`` or a ``.gguf``
    (``pkg://package/file`` paths resolve inside an installed package)."""
    p = resolve_path(path)
    if p.suffix == ".gguf":
        import gguf  # lazy: not on every machine
        reader = gguf.GGUFReader(str(p))
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
        return _from_gguf_metadata(meta, source=str(p))
    directory = p if p.is_dir() else p.parent
    config = _read_json(directory / "tokenizer_config.json")
    specials_map = _read_json(directory / "special_tokens_map.json")
    json_file = p if p.is_file() and p.suffix == ".json" else directory / "tokenizer.json"
    sp_file = p if p.is_file() and p.suffix == ".model" else directory / "tokenizer.model"
    sp_bytes = sp_file.read_bytes() if sp_file.is_file() else None
    if json_file.is_file() and not (p.is_file() and p.suffix == ".model"):
        try:
            backend = BackendTokenizer.from_file(str(json_file))
        except Exception as e:  # the Rust error says what is wrong, not where
            raise CheckpointError(f"{json_file}: not a valid tokenizers file: {e}") from None
        defaults, source = {}, str(json_file)
    elif sp_bytes is not None:
        backend, defaults = _from_sentencepiece(sp_bytes, str(sp_file))
        source = str(sp_file)
    else:
        raise CheckpointError(f"{path}: no tokenizer.json, tokenizer.model or .gguf found")

    def special(name):
        value = config.get(name, specials_map.get(name, defaults.get(name)))
        return value.get("content") if isinstance(value, dict) else value

    bos, eos = special("bos_token"), special("eos_token")
    if "add_bos_token" in config or "add_eos_token" in config or sp_bytes is not None and source.endswith(".model"):
        add_bos = config.get("add_bos_token", defaults.get("add_bos_token", False))
        add_eos = config.get("add_eos_token", False)
    else:  # tokenizer.json alone: its post-processor says what HF adds
        probe = backend.encode("", add_special_tokens=True).ids
        bos_id = backend.token_to_id(bos) if bos else None
        eos_id = backend.token_to_id(eos) if eos else None
        add_bos = bool(probe) and probe[0] == bos_id
        add_eos = bool(probe) and probe[-1] == eos_id and not (add_bos and len(probe) == 1 and bos_id != eos_id)
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=special("pad_token"),
                     unk_token=special("unk_token"), add_bos_token=add_bos, add_eos_token=add_eos,
                     chat_template=_chat_template_from(directory, config),
                     sentencepiece_model=sp_bytes, source=source)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


def _chat_template_from(directory: Path, config: dict) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


# ----------------------------------------------------------------------------- sentencepiece
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def _from_sentencepiece(model_bytes: bytes, source: str):
    """Convert a sentencepiece ModelProto into a ``tokenizers`` backend (+ default specials)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as e:
        raise CheckpointError(f"{source}: not a sentencepiece model: {e}") from None
    pieces = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    kind = {1: "unigram", 2: "bpe"}.get(trainer.model_type)
    if kind is None:
        raise CheckpointError(f"{source}: sentencepiece model_type {trainer.model_type} is not supported "
                             "(only unigram and bpe)")
    backend = _sentencepiece_backend(
        pieces, scores, types, kind=kind, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback,
        add_prefix_space=norm.add_dummy_prefix, charsmap=norm.precompiled_charsmap,
        collapse_whitespace=norm.remove_extra_whitespaces)

    def piece(i):
        return pieces[i] if 0 <= i < len(pieces) else None
    defaults = dict(bos_token=piece(trainer.bos_id), eos_token=piece(trainer.eos_id),
                    unk_token=piece(trainer.unk_id), pad_token=piece(trainer.pad_id),
                    add_bos_token=trainer.bos_id >= 0)
    return backend, defaults


def _merges_from_scores(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]):
    """BPE merges implied by a scored vocabulary: a merge ranks by the score of its result."""
    vocab = {p: i for i, p in enumerate(pieces)}
    ranked = []
    for piece, score, kind in zip(pieces, scores, types):
        if kind not in (_SP_NORMAL, _SP_USER) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_backend(pieces, scores, types, *, kind="bpe", unk_id=0, byte_fallback=True,
                           add_prefix_space=True, charsmap=b"", collapse_whitespace=False,
                           merges=None) -> BackendTokenizer:
    unk_id = unk_id if 0 <= unk_id < len(pieces) else None
    if kind == "bpe":
        vocab = {p: i for i, p in enumerate(pieces)}
        merges = merges if merges is not None else _merges_from_scores(pieces, scores, types)
        model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk_id] if unk_id is not None else None,
                           fuse_unk=True, byte_fallback=byte_fallback, dropout=None)
    else:
        model = models.Unigram(list(zip(pieces, scores)), unk_id=unk_id, byte_fallback=byte_fallback)
    backend = BackendTokenizer(model)
    # sentencepiece's own order: charsmap, whitespace cleanup, dummy prefix, spaces → "▁".
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    if collapse_whitespace:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if add_prefix_space:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    _add_typed_special_tokens(backend, pieces, types)
    return backend


def _add_typed_special_tokens(backend: BackendTokenizer, tokens, types, alphabet=None) -> None:
    """Control / unknown tokens become special added tokens and user-defined ones plain added
    tokens, so they are matched whole in text."""
    special = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k in (_SP_CONTROL, _SP_UNKNOWN) and (alphabet is None or set(t) <= alphabet)]
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == _SP_USER]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


# ----------------------------------------------------------------------------- GGUF
# Split pattern of Llama-3 style byte-level vocabularies (tiktoken's cl100k form).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx")}


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


def _from_gguf_metadata(meta: dict, source: str) -> Tokenizer:
    def get(key, default=None):
        return meta.get(f"tokenizer.{key}", default)

    kind = get("ggml.model")
    tokens = list(get("ggml.tokens") or [])
    if not tokens:
        raise CheckpointError(f"{source}: no tokenizer.ggml.tokens in the GGUF metadata")
    types = list(get("ggml.token_type") or [_SP_NORMAL] * len(tokens))
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
        _add_typed_special_tokens(backend, tokens, types, alphabet=alphabet)
        add_bos = bool(add_bos) if add_bos is not None else False
    elif kind == "llama":
        scores = list(get("ggml.scores") or [0.0] * len(tokens))
        add_prefix = get("ggml.add_space_prefix")
        backend = _sentencepiece_backend(
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


# ------------------------------------------------------------------------------ tiny presets
def byte_tokenizer(add_bos_token: bool = True):
    """A 259-token byte-level tokenizer (``<pad> <s> </s>`` + 256 bytes) for the tiny presets."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[ch] = 3 + i
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<pad>", "<s>", "</s>"])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=add_bos_token,
                     source="<medjax byte tokenizer>")


def preset_tokenizer(preset: str | None):
    """The tokenizer a random-init preset trains with: bytes for ``tiny-*``, else None."""
    return byte_tokenizer() if preset and preset.startswith("tiny") else None
