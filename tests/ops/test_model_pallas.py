"""The tiny Mistral (sliding window 8 < sequence) gives the same logits with "xla" and "pallas"."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medjax.models import Decoder, get_preset


def _logits_both_ways(model, ids, **kw):
    model.set_attention_impl("xla")
    want = np.asarray(model.forward(ids, **kw).logits)
    model.set_attention_impl("pallas")
    got = np.asarray(model.forward(ids, **kw).logits)
    return got, want


def test_tiny_mistral_logits_xla_vs_pallas():
    cfg = get_preset("tiny-mistral")
    assert cfg.sliding_window < 40
    model = Decoder(cfg, rngs=nnx.Rngs(0), attention_impl="xla")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 40)))
    segment_ids = jnp.asarray(np.repeat([1, 2, 3], [9, 20, 11])[None].repeat(2, 0))
    for kw in (dict(), dict(segment_ids=segment_ids)):
        got, want = _logits_both_ways(model, ids, **kw)
        scale = max(np.abs(want).max(), 1.0)
        assert np.abs(got - want).max() <= 1e-5 * scale, (kw.keys(), np.abs(got - want).max())
    model.set_attention_impl("no-such-impl")   # the switch really reaches ops.attention
    with pytest.raises(ValueError, match="unknown attention implementation"):
        model.forward(ids)
