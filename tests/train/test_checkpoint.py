"""Checkpointer: round trip, keep-last-K, corrupt newest → warning + fallback, shape mismatch error."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.train.checkpoint import CheckpointError, Checkpointer


def _state(scale=1.0):
    return {"step": jnp.int32(0), "params": {"w": scale * jnp.arange(6.0).reshape(2, 3)},
            "rng": jax.random.key(3)}


def test_round_trip_keep_and_corrupt_fallback(tmp_path):
    ck = Checkpointer(tmp_path, every=1, keep=2, async_save=True)
    for step in (1, 2, 3):
        ck.save(step, _state(step), {"data": {"next_index": step}})
    ck.close()
    ck = Checkpointer(tmp_path, every=1, keep=2)
    assert ck.steps() == [2, 3]
    state, meta, step = ck.restore(_state())
    assert step == 3 and meta["data"] == {"next_index": 3}
    np.testing.assert_array_equal(state["params"]["w"], 3 * np.arange(6.0).reshape(2, 3))
    assert jnp.array_equal(jax.random.key_data(state["rng"]), jax.random.key_data(jax.random.key(3)))

    for f in glob.glob(str(tmp_path / "3" / "**"), recursive=True):
        if os.path.isfile(f):
            with open(f, "wb") as fh:
                fh.write(b"\x00garbage")
    with pytest.warns(UserWarning, match=r"checkpoint .*3 is unreadable.*falling back to step 2"):
        state, meta, step = Checkpointer(tmp_path).restore(_state())
    assert step == 2 and meta["data"] == {"next_index": 2}
    np.testing.assert_array_equal(state["params"]["w"], 2 * np.arange(6.0).reshape(2, 3))


def test_mismatched_template_is_a_clear_error(tmp_path):
    ck = Checkpointer(tmp_path, async_save=False)
    ck.save(1, _state(), {})
    ck.close()
    with pytest.raises(CheckpointError, match="lacks 'params.v'"):
        Checkpointer(tmp_path).restore({"step": jnp.int32(0), "params": {"v": jnp.zeros(3)},
                                        "rng": jax.random.key(0)})
