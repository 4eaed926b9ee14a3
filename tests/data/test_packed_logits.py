"""Packed rows through the real Decoder give each example's logits as if it ran alone."""
import numpy as np
import pytest

from medjax.config import DataSection


def test_packed_batch_logits_equal_each_example_alone(tmp_path, make_tokenizer, write_jsonl):
    jnp = pytest.importorskip("jax.numpy")
    models = pytest.importorskip("medjax.models")
    from medjax.data import make_dataset
    tokenizer = make_tokenizer(vocab_size=400)
    cfg_model = models.get_preset("tiny-mistral")  # GQA + sliding window 8: windows must reset per segment
    assert tokenizer.vocab_size <= cfg_model.vocab_size
    model = models.init_decoder(cfg_model, seed=0)
    rows = [{"text": "the heart pumps blood " * (1 + i % 4)} for i in range(12)]
    data = DataSection(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), seq_len=48)
    batch = next(make_dataset(data, tokenizer, batch_size=2, seed=0, process_index=0, process_count=1))
    assert (batch["segment_ids"].max(axis=1) >= 2).all(), "rows should hold several examples"
    packed_BTV = np.asarray(model(jnp.asarray(batch["input_ids"]), positions=jnp.asarray(batch["positions"]),
                                  segment_ids=jnp.asarray(batch["segment_ids"])))
    checked = 0
    for b in range(2):
        seg = batch["segment_ids"][b]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            alone_TV = np.asarray(model(jnp.asarray(batch["input_ids"][b, where][None]))[0])
            np.testing.assert_allclose(packed_BTV[b, where], alone_TV, atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked >= 4
    # the check is sensitive: without segment ids later examples attend to earlier ones
    unmasked_BTV = np.asarray(model(jnp.asarray(batch["input_ids"]), positions=jnp.asarray(batch["positions"])))
    second = batch["segment_ids"][0] == 2
    assert not np.allclose(unmasked_BTV[0, second], packed_BTV[0, second], atol=1e-3)
    # (RoPE and the sliding window depend only on position differences, so the per-segment reset
    # of ``positions`` is checked directly in test_pipeline.py rather than through logits.)
