"""Bad input is reported with file, line/offset and field; on_error=skip counts what it drops."""
import json

import pytest

from medjax.config import DataSection
from medjax.data import DataError, make_dataset
from medjax.data.sources import read_rows


def batches(cfg, tokenizer, **kw):
    return make_dataset(cfg, tokenizer, batch_size=2, seq_len=64, seed=0, process_index=0, process_count=1, **kw)


def test_missing_field_names_file_line_and_field(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: missing field 'output'"):
        batches(DataSection(train=str(path), format="alpaca"), tokenizer)


def test_invalid_json_and_skip_counts(tmp_path, tokenizer):
    path = tmp_path / "b.jsonl"
    path.write_text('{"text": "good row one"}\n{"text": oops}\n{"txt": "wrong key"}\n\n{"text": "good two"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: invalid JSON"):
        batches(DataSection(train=str(path)), tokenizer)
    it = batches(DataSection(train=str(path), on_error="skip"), tokenizer, num_epochs=1)
    texts = {tokenizer.decode(b) for batch in it for b in batch["input_ids"][batch["segment_ids"] > 0].reshape(1, -1)}
    assert it.skipped == 2 and "b.jsonl:3" in it.skips.summary()
    assert any("good row one" in t and "good two" in t for t in texts)


def test_non_utf8_names_byte_offset(tmp_path):
    path = tmp_path / "c.jsonl"
    data = b'{"text": "ok"}\n{"text": "caf\xe9"}\n'
    path.write_bytes(data)
    offset = data.index(0xE9)
    with pytest.raises(DataError, match=rf"c\.jsonl:2: not UTF-8 at byte offset {offset}\b"):
        read_rows(str(path))
    (tmp_path / "d.txt").write_bytes(b"abc\xffdef")
    with pytest.raises(DataError, match=r"d\.txt: not UTF-8 at byte offset 3"):
        read_rows(str(tmp_path / "d.txt"))


def test_empty_dataset_errors_before_training(tmp_path, tokenizer, write_jsonl):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable examples"):
        batches(DataSection(train=str(tmp_path / "empty.jsonl")), tokenizer)
    with pytest.raises(DataError, match="no data files"):
        batches(DataSection(train=str(tmp_path / "nothing*.jsonl")), tokenizer)
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "word " * 200}])
    with pytest.raises(DataError, match="none of the first 1 examples"):
        batches(DataSection(train=str(path), long_examples="drop"), tokenizer)


def test_file_kinds_dir_and_glob(tmp_path, write_jsonl):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"data": [{"text": "three"}]}))
    pq.write_table(pa.table({"text": ["four", "five"]}), tmp_path / "sub" / "c.parquet")
    (tmp_path / "sub" / "d.txt").write_text("six")
    rows = read_rows(str(tmp_path / "sub"))
    assert [r.record["text"] for r in rows] == ["one", "two", "three", "four", "five", "six"]
    assert rows[0].where.endswith("a.jsonl:1") and rows[3].where.endswith("c.parquet:row 0")
    assert len(read_rows(str(tmp_path / "sub" / "*.jsonl"))) == 2
