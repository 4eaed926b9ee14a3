"""The tokenizer interface: ``Tokenizer`` over a ``tokenizers.Tokenizer`` backend (the Rust library
HF uses), whatever file it came from (``files.py``: tokenizer.json / tokenizer.model; GGUF:
``medjax.hf.gguf_vocab``), and the byte-level tokenizer of the tiny presets.

``encode(text, add_special_tokens=True)`` adds BOS/EOS as ``add_bos_token``/``add_eos_token``
say (HF's behaviour); chat templates render in jinja2's sandbox with HF's conventions
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``strftime_now``). Built-in named
templates cover models that ship none: see ``BUILTIN_CHAT_TEMPLATES``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tokenizers import decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from medjax.chat_templates import BUILTIN_CHAT_TEMPLATES, TURN_END_TOKENS, sandbox
from medjax.errors import CheckpointError
from medjax.outputs import write_file


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

    def __repr__(self):
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, add_bos={self.add_bos_token})")


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
