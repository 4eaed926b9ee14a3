"""NEFTune noise scale (train only) and the DPO loss/gradients against direct jnp formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medjax.config import LoraSection
from medjax.lora import apply_lora
from medjax.models import get_preset, init_decoder
from medjax.models.decoder import logits_nll
from medjax.train import dpo
from medjax.train import step as S
from medjax.train.objectives import DPO, CausalLM
from medjax.train.neftune import attach_neftune, neftune_noise, noisy_embeddings


def test_neftune_noise_scale_per_packed_segment_and_none_on_padding():
    alpha, D = 5.0, 512
    seg = jnp.array([[1] * 100 + [2] * 300 + [0] * 112, [1] * 512])     # packed row + full row
    noise = np.asarray(neftune_noise(jax.random.key(0), (2, 512, D), seg, alpha))
    for rows, L in (((0, slice(0, 100)), 100), ((0, slice(100, 400)), 300), ((1, slice(None)), 512)):
        block = noise[rows]
        bound = alpha / np.sqrt(L * D)                      # uniform(-1, 1) * alpha / sqrt(L d)
        assert np.abs(block).max() <= bound + 1e-7
        np.testing.assert_allclose(block.std(), bound / np.sqrt(3), rtol=0.02)
    assert np.all(noise[0, 400:] == 0)


def test_neftune_changes_training_forward_only():
    model = init_decoder(get_preset("tiny-llama2"))
    attach_neftune(model, 5.0, seed=0)
    ids = jax.random.randint(jax.random.key(1), (2, 16), 3, 512)
    batch = {"input_ids": ids, "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
             "segment_ids": jnp.ones((2, 16), jnp.int32), "targets": jnp.roll(ids, -1, 1),
             "loss_mask": jnp.ones((2, 16), jnp.float32)}
    graphdef, params, rngs, frozen = S.split_model(model, lora=False)
    plain = model.model.embed_tokens(ids)
    noisy = noisy_embeddings(nnx.merge(graphdef, params, rngs, frozen), batch)
    delta = np.asarray(noisy - plain)
    assert 0 < np.abs(delta).max() <= 5.0 / np.sqrt(16 * 64) + 1e-6
    # training objective sees the noise; eval loss (deterministic view) does not
    train_obj = CausalLM().loss(params, rngs, frozen, {}, batch, 32.0, graphdef=graphdef, n_micro=1)[0]
    nll = CausalLM().eval_stats(params, rngs, frozen, {}, batch, graphdef=graphdef)["nll_sum"]
    logits = model(ids)
    clean = float(jnp.sum(logits_nll(logits, batch["targets"])))
    np.testing.assert_allclose(float(nll), clean, rtol=1e-5)
    assert abs(float(train_obj) * 32.0 - clean) > 1e-4
    viewed = nnx.view(nnx.merge(graphdef, params, rngs, frozen), deterministic=True,
                      raise_if_not_found=False)
    assert noisy_embeddings(viewed, batch) is None


# ------------------------------------------------------------------------------ DPO
def _pair_batch():
    """Two unpacked pairs and one packed row holding two more pairs (T = 12)."""
    T = 12
    rng = np.random.default_rng(0)
    b = {}
    for side in ("chosen_", "rejected_"):
        ids = rng.integers(3, 512, (3, T)).astype(np.int32)
        seg = np.array([[1] * 9 + [0] * 3, [1] * 12, [1] * 5 + [2] * 6 + [0]], np.int32)
        mask = np.zeros((3, T), np.float32)
        mask[0, 4:8] = mask[1, 6:11] = 1
        mask[2, 2:4] = mask[2, 8:10] = 1                 # answers of both packed pairs
        pos = np.concatenate([np.arange(5), np.arange(7)])[None].repeat(3, 0)
        pos[:2] = np.arange(T)
        b.update({side + "input_ids": ids, side + "targets": np.roll(ids, -1, 1), side + "loss_mask": mask,
                  side + "segment_ids": seg, side + "positions": pos.astype(np.int32)})
    return {k: jnp.asarray(v) for k, v in b.items()}


PAIRS = [(0, 1), (1, 1), (2, 1), (2, 2)]                  # (row, segment)


def _direct_logps(model, batch, side):
    """Answer log-prob of each pair, computed sequence by sequence."""
    out = []
    for row, s in PAIRS:
        keep = np.asarray(batch[side + "segment_ids"][row]) == s
        ids = batch[side + "input_ids"][row][keep][None]
        pos = batch[side + "positions"][row][keep][None]
        logits = model.forward(ids, positions=pos).logits[0]
        logp = jax.nn.log_softmax(logits, -1)
        tok = jnp.take_along_axis(logp, batch[side + "targets"][row][keep][:, None], -1)[:, 0]
        out.append(jnp.sum(tok * batch[side + "loss_mask"][row][keep]))
    return jnp.stack(out)


def _direct_loss(lora_params, graphdef, frozen, rngs, batch, beta, ls):
    policy = nnx.merge(graphdef, lora_params, rngs, frozen)
    ref = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, lora_params), rngs, frozen)
    pc, pr = _direct_logps(policy, batch, "chosen_"), _direct_logps(policy, batch, "rejected_")
    rc, rr = _direct_logps(ref, batch, "chosen_"), _direct_logps(ref, batch, "rejected_")
    h = beta * ((pc - rc) - (pr - rr))
    return jnp.mean(-(1 - ls) * jnp.log(jax.nn.sigmoid(h)) - ls * jnp.log(jax.nn.sigmoid(-h))), (pc, pr, rc, rr)


def test_dpo_loss_and_grads_match_the_formula_on_a_hand_made_batch():
    model = init_decoder(get_preset("tiny-llama2"))
    apply_lora(model, LoraSection(enabled=True, rank=4, targets=("q_proj", "v_proj", "down_proj")))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
    keys = jax.random.split(jax.random.key(3), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape)
                                                   for x, k in zip(leaves, keys)]))
    graphdef, params, rngs, frozen = S.split_model(model, lora=True)
    batch = _pair_batch()
    beta, ls = 0.3, 0.1
    objective = DPO(beta=beta, label_smoothing=ls, reference_mode="adapters_off")
    (obj, (stats, _)), grads = jax.jit(jax.value_and_grad(
        functools.partial(objective.loss, graphdef=graphdef, n_micro=1), has_aux=True))(
        params, rngs, frozen, {}, batch, 4.0)
    # the batch is closed over as numpy (concrete): the reference slices sequences with masks
    numpy_batch = {k: np.asarray(v) for k, v in batch.items()}
    direct = functools.partial(_direct_loss, graphdef=graphdef, frozen=frozen, rngs=rngs,
                               batch=numpy_batch, beta=beta, ls=ls)
    (ref_loss, (pc, pr, rc, rr)), ref_grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(params)
    assert float(stats["pairs"]) == 4
    np.testing.assert_allclose(float(obj), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(float(stats["rewards_chosen"]), float(jnp.sum(beta * (pc - rc))), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(stats["rewards_rejected"]), float(jnp.sum(beta * (pr - rr))), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(stats["rewards_accuracy"]), float(jnp.sum((pc - rc) > (pr - rr))))
    for (k, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)):
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(r.get_value()),
                                   rtol=2e-4, atol=1e-7, err_msg=str(k))


def test_dpo_loss_function_matches_closed_form():
    pc, pr, rc, rr = (jnp.array(v) for v in ([-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.9, -2.5]))
    loss, stats = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    h = 0.5 * ((pc - rc) - (pr - rr))
    expected = -(0.8 * jnp.log(jax.nn.sigmoid(h)) + 0.2 * jnp.log(jax.nn.sigmoid(-h)))
    np.testing.assert_allclose(float(loss), float(jnp.sum(expected)), rtol=1e-6)
    np.testing.assert_allclose(float(stats["rewards_margin"]), float(jnp.sum(h)), rtol=1e-6)
