"""Security: no unsafe deserialisation or code execution in the package, safetensors headers
validated before any allocation, paths from files confined to their roots, chat templates
sandboxed. (tests/hf/test_bad_checkpoints.py covers missing/unexpected/shape/pickle-only/
truncated/huge-shape/overlap; the cases here are the other header checks.)
"""
import io
import json
import os
import struct
import tokenize
from pathlib import Path

import jinja2
import pytest

from medjax.errors import CheckpointError, ConfigError
from medjax.hf.safetensors_io import MAX_HEADER_BYTES, index_tensors, read_header
from medjax.paths import inside, separate_output

PACKAGE = Path(__file__).resolve().parents[2] / "medjax"
BANNED_NAMES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "trust_remote_code"}
REFUSAL_WORDS = ("never", "refus", "not ", "no ", "only ")


def _code_tokens(path: Path):
    return list(tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline))


def test_package_never_unpickles_evals_execs_or_trusts_remote_code():
    """Code tokens (strings and comments excluded) may not use the banned names at all; text
    mentions (messages, comments) are allowed only where they refuse."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        toks = _code_tokens(path)
        for i, tok in enumerate(toks):
            prev = toks[i - 1].string if i else ""
            nxt = toks[i + 1].string if i + 1 < len(toks) else ""
            where = f"{path.relative_to(PACKAGE.parent)}:{tok.start[0]}"
            if tok.type == tokenize.NAME:
                if tok.string in BANNED_NAMES:
                    hits.append(f"{where}: {tok.string}")
                elif tok.string in ("eval", "exec", "compile", "__import__") and prev not in (".", "def") \
                        and nxt == "(":
                    hits.append(f"{where}: {tok.string}(")
                elif tok.string == "load" and prev == "." and toks[i - 2].string == "torch":
                    hits.append(f"{where}: torch.load")
                elif tok.string == "allow_pickle" and nxt == "=" and toks[i + 2].string == "True":
                    hits.append(f"{where}: allow_pickle=True")
                elif tok.string == "load" and prev == "." and toks[i - 2].string == "yaml":
                    hits.append(f"{where}: yaml.load (use yaml.safe_load)")
        lines = path.read_text(encoding="utf-8").lower().splitlines()
        for n, low in enumerate(lines, 1):
            block = "\n".join(lines[max(n - 4, 0): n + 3])     # the statement around the mention
            if any(w in low for w in ("pickle", "trust_remote_code", "torch.load")) \
                    and not any(w in block for w in REFUSAL_WORDS + ("raise ",)):
                line = low
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{n}: mention that does not refuse: "
                            f"{line.strip()[:100]}")
    assert not hits, "\n".join(hits)


# ------------------------------------------------------------------------------ safetensors headers
def _st(path: Path, header, data: bytes = b"", header_len=None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


@pytest.mark.parametrize("name,header,data,match", [
    ("negative-dim", {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16,
     "negative dimension"),
    ("reversed-offsets", {"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8,
     "offsets 8..0"),
    ("offsets-size-mismatch", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12,
     "do not match"),
    ("offset-past-end", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, b"\0" * 16,
     "ends at byte 32"),
    ("header-is-a-list", [1, 2], b"", "not a JSON object"),
    ("shape-not-ints", {"w": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}}, b"\0" * 4,
     "malformed header entry"),
    ("missing-offsets", {"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed header entry"),
    ("header-not-utf8", b"\xff\xfe{}", b"", "not valid JSON"),
])
def test_safetensors_header_rejected(tmp_path, name, header, data, match):
    with pytest.raises(CheckpointError, match=match):
        read_header(_st(tmp_path / f"{name}.safetensors", header, data))


def test_header_length_bounds_checked_before_reading(tmp_path):
    """A header length over the 100 MiB cap is refused on the 8-byte prefix alone (sparse file:
    the bytes are never read), as is a length past the end of the file or a file under 8 bytes."""
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(MAX_HEADER_BYTES + 64)          # big enough to hold it: the cap alone refuses
    with pytest.raises(CheckpointError, match="header claims"):
        read_header(sparse)
    with pytest.raises(CheckpointError, match="header claims"):
        read_header(_st(tmp_path / "short.safetensors", b"{}", header_len=100))
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_header(tmp_path / "tiny.safetensors")


def test_metadata_entry_allowed_and_duplicates_across_shards_refused(tmp_path):
    good = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    a = _st(tmp_path / "a.safetensors", good, b"\0" * 8)
    b = _st(tmp_path / "b.safetensors", good, b"\0" * 8)
    assert list(read_header(a)) == ["w"]
    with pytest.raises(CheckpointError, match="'w' appears in both"):
        index_tensors([a, b])


# ------------------------------------------------------------------------------ paths
def test_paths_from_files_stay_inside_their_root(tmp_path):
    root = tmp_path / "model"
    root.mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "secret.safetensors", root / "link.safetensors")
    assert inside(root, "model-00001.safetensors") == (root / "model-00001.safetensors").resolve()
    assert inside(root, "sub/../x.safetensors") == (root / "x.safetensors").resolve()
    for bad in ("../secret.safetensors", str(tmp_path / "secret.safetensors"), "link.safetensors",
                "sub/../../secret.safetensors"):
        with pytest.raises(ConfigError, match="escapes"):
            inside(root, bad)


def test_output_directory_never_overlaps_an_input(tmp_path):
    src = tmp_path / "run" / "checkpoints"
    assert separate_output(tmp_path / "export", src) == (tmp_path / "export").resolve()
    for bad in (src, tmp_path / "run", src / "inner", tmp_path):
        with pytest.raises(ConfigError, match="overlaps the input"):
            separate_output(bad, src)


# ------------------------------------------------------------------------------ chat templates
@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ messages.append({'role': 'user'}) }}",          # immutable sandbox: no mutation either
])
def test_chat_templates_are_sandboxed(rel_model_dir, template):
    from medjax.tokenizer import load_tokenizer
    tok = load_tokenizer(rel_model_dir)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises((jinja2.exceptions.SecurityError, CheckpointError)):
        out = tok.apply_chat_template(messages, chat_template=template)
        # jinja's sandbox renders some unsafe attribute lookups as undefined (empty): that is a
        # refusal too, as long as nothing of Python's internals reaches the output
        if "class" not in out and "function" not in out and "module" not in out and len(messages) == 1:
            raise jinja2.exceptions.SecurityError(f"refused (rendered {out!r})")
    assert messages == [{"role": "user", "content": "hi"}]
