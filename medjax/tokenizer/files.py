"""Loading a tokenizer from files: an HF directory, ``tokenizer.json``, ``tokenizer.model`` or a
``.gguf`` (its vocabulary reader is ``medjax.hf.gguf_vocab``, next to its writer).

Special tokens (BOS/EOS/PAD, ``add_bos_token``/``add_eos_token``, chat template) come from
``tokenizer_config.json`` / ``special_tokens_map.json`` / ``chat_template.jinja``.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer

from medjax.errors import CheckpointError
from medjax.paths import resolve_path
from medjax.tokenizer.core import Tokenizer
from medjax.tokenizer.sentencepiece import from_sentencepiece


def load_tokenizer(path) -> Tokenizer:
    """Load from an HF model directory, a ``tokenizer.json``, a ``tokenizer.model`` or a ``.gguf``
    (``pkg://package/file`` paths resolve inside an installed package)."""
    p = resolve_path(path)
    if p.suffix == ".gguf":
        import gguf  # lazy: not on every machine

        from medjax.hf.gguf_vocab import read_tokenizer
        return read_tokenizer(gguf.GGUFReader(str(p)), source=str(p))
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
        backend, defaults = from_sentencepiece(sp_bytes, str(sp_file))
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
