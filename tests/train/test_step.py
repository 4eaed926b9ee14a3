"""Gradient accumulation is the big batch, up to summation order."""
import jax
import jax.numpy as jnp
import numpy as np

from medjax.models import get_preset, init_decoder
from medjax.train.objectives import CausalLM
from medjax.train.step import accumulate_grads, micro_batches, split_model


def _batch(B=8, T=16, vocab=512, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (B, T + 1))
    lengths = rng.integers(T // 2, T + 1, B)                        # ragged, padded rows
    seg = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
    mask = seg * (np.arange(T)[None, :] >= 3)                      # prompt tokens excluded
    return {"input_ids": jnp.asarray(ids[:, :-1] * seg), "targets": jnp.asarray(ids[:, 1:] * seg),
            "positions": jnp.asarray(np.broadcast_to(np.arange(T), (B, T))),
            "segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(mask, jnp.float32)}


def test_grad_accum_4x2_equals_batch_8():
    model = init_decoder(get_preset("tiny-llama"), seed=0, attention_impl="xla")
    graphdef, params, rngs, frozen = split_model(model, lora=False)
    batch = _batch()
    run = jax.jit(accumulate_grads, static_argnames=("graphdef", "grad_accum", "objective"))
    g1, _, m1 = run(params, rngs, frozen, {}, batch, graphdef=graphdef, grad_accum=1, objective=CausalLM())
    g4, _, m4 = run(params, rngs, frozen, {}, batch, graphdef=graphdef, grad_accum=4, objective=CausalLM())
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    # token-weighted mean NLL, from scratch
    logits = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    want = jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])
    np.testing.assert_allclose(m1["loss"], want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_micro_batches_are_strided_and_keep_dpo_pairs_together():
    """Micro-batch i = rows i, i+A, ...: each device's contiguous block of the batch gives every
    micro-batch the same share (tests/distributed/test_accum_split.py checks the compiled
    step); a DPO pair (row r of chosen_* and of rejected_*) lands at one index of one micro-batch."""
    B, A = 12, 3
    rows = np.arange(B)[:, None] * np.ones((1, 5), np.int32)
    micro = micro_batches({"chosen_input_ids": rows, "rejected_input_ids": rows + 100}, A)
    for i in range(A):
        np.testing.assert_array_equal(micro["chosen_input_ids"][i], rows[i::A])
        np.testing.assert_array_equal(micro["rejected_input_ids"][i] - micro["chosen_input_ids"][i], 100)
    # 4 devices holding 3 consecutive rows each: every micro-batch takes one row from each
    owner = np.asarray(micro["chosen_input_ids"])[:, :, 0] // (B // 4)
    np.testing.assert_array_equal(owner, np.broadcast_to(np.arange(4), (A, 4)))
