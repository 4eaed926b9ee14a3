"""Session fixtures for training tests: a tiny HF model dir (byte tokenizer) and an Alpaca file."""
import pytest

from train_helpers import make_tiny_model_dir, write_alpaca


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_alpaca(tmp_path_factory):
    return write_alpaca(tmp_path_factory.mktemp("data") / "train.jsonl")
