"""The data position a checkpoint holds: one iterator state for every process count, checked
equal across processes when saved (here with a simulated second process)."""
import json

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from medjax.errors import CheckpointError, DataError
from medjax.train.loop import _same_on_every_host, _saved_data_state

STATE = {"next_index": 12, "parent": {"next_index": 40}}


def _two_processes(monkeypatch, other_state):
    """``process_allgather`` as if a second process held ``other_state``."""
    other = np.frombuffer(json.dumps(other_state, sort_keys=True).encode(), np.uint8)

    def gather(x):
        if x.dtype == np.int64:                       # the sizes
            return np.stack([x, np.array([other.size], np.int64)])
        padded = np.zeros(x.size, np.uint8)
        padded[:other.size] = other
        return np.stack([x, padded])
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", gather)


def test_the_same_state_on_every_process_is_saved_once(monkeypatch):
    _two_processes(monkeypatch, dict(reversed(STATE.items())))     # key order does not matter
    assert _same_on_every_host(STATE) == STATE


@pytest.mark.parametrize("other", [{"next_index": 13, "parent": {"next_index": 40}},
                                   {"next_index": 12, "parent": {"next_index": 400}}])
def test_processes_at_different_positions_stop_with_a_data_error(monkeypatch, other):
    _two_processes(monkeypatch, other)
    with pytest.raises(DataError, match=r"processes \[1\] are at another position of the training data"):
        _same_on_every_host(STATE)


def test_saved_state_forms():
    assert _saved_data_state(STATE) == STATE
    assert _saved_data_state([STATE]) == STATE                      # a 1-process run before 2026-12-06
    with pytest.raises(CheckpointError, match="per-process data positions of 2 processes"):
        _saved_data_state([STATE, STATE])
