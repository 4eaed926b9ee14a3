"""The fast path (rows tokenized in groups, one prefetch thread, each sequence packed as one array) must
give exactly the batches of the straightforward reference path (``build_dataset(fast_path=False)``)."""
import json
from pathlib import Path

import grain
import numpy as np
import pytest

from medjax.config import DataSection
from medjax.data import Renderer, build_dataset
from medjax.data.examples import encode_rendered, encode_rendered_batch

MED_INSTRUCT = Path(__file__).resolve().parents[2] / "medjax" / "assets" / "med_instruct.jsonl"
SYNC = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def batches(cfg, tokenizer, **kwargs):
    ds = build_dataset(cfg, tokenizer, batch_size=4, seed=5, num_epochs=1, process_index=1, process_count=2, **kwargs)
    return list(ds)


@pytest.mark.parametrize("options", [
    dict(seq_len=256),
    dict(seq_len=256, pack=False),
    dict(seq_len=48, long_examples="split"),
    dict(seq_len=512, prompt_style="chat", chat_template="chatml", system_prompt="Answer briefly."),
])
def test_fast_path_equals_per_example_path(tokenizer, options):
    cfg = DataSection(train=str(MED_INSTRUCT), format="alpaca", **options)
    fast = batches(cfg, tokenizer)
    slow = batches(cfg, tokenizer, read_options=SYNC, fast_path=False)
    assert len(fast) == len(slow) > 3
    for fast_batch, slow_batch in zip(fast, slow):
        assert sorted(fast_batch) == sorted(slow_batch) == sorted(
            ("input_ids", "positions", "segment_ids", "targets", "loss_mask"))
        for key in slow_batch:
            assert fast_batch[key].dtype == slow_batch[key].dtype, key
            np.testing.assert_array_equal(fast_batch[key], slow_batch[key], err_msg=key)


@pytest.mark.parametrize("prompt_style", ["alpaca", "chat"])
def test_batched_encode_equals_encode_rendered(tokenizer, prompt_style):
    renderer = Renderer("alpaca", tokenizer, prompt_style=prompt_style, chat_template="chatml")
    records = [json.loads(line) for line in MED_INSTRUCT.read_text(encoding="utf-8").splitlines()]
    rendered = [renderer.render(r)[""] for r in records]
    rendered.append(rendered[0]._replace(text="", spans=((0, 0),)))  # empty text: BOS/EOS only
    batched = encode_rendered_batch(rendered, tokenizer)
    assert len(batched) == len(rendered)
    for r, fast in zip(rendered, batched):
        slow = encode_rendered(r, tokenizer)
        for key in slow:
            assert fast[key].dtype == slow[key].dtype
            np.testing.assert_array_equal(fast[key], slow[key], err_msg=f"{key} of {r.text[:40]!r}")
