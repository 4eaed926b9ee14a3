"""Fixtures of the reliability suites: a tiny HF model with a byte tokenizer, tiny data, a compile cache."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def rel_model_dir(tmp_path_factory):
    from train_helpers import make_tiny_model_dir
    return make_tiny_model_dir(tmp_path_factory.mktemp("rel_model"))


@pytest.fixture(scope="session")
def rel_text_data(tmp_path_factory):
    from reliability_helpers import write_text_data
    return write_text_data(tmp_path_factory.mktemp("rel_data") / "train.jsonl")


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def pytest_terminal_summary(terminalreporter):
    from reliability_helpers import FIGURES
    if FIGURES["faults_injected"]:
        terminalreporter.write_line(
            f"faults: {FIGURES['faults_survived']} survived / {FIGURES['faults_injected']} injected")
    if FIGURES["bad_inputs_tried"]:
        terminalreporter.write_line(
            f"bad inputs: {FIGURES['bad_inputs_clean']} clean errors / {FIGURES['bad_inputs_tried']} tried")
