"""Serving test helpers (a module of its own: under xdist, ``from conftest import`` may find
another directory's conftest): the SmolLM2-tokenizer model directory and an in-process server."""
from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path

SERVE_KW = dict(page_size=16, max_slots=8, max_context=256, max_prefill_batch=2,
                kv_budget_bytes=8 << 20)


def make_tiny_model_dir(out: Path, gguf_path: Path) -> Path:
    """HF directory: tiny random Llama (vocab 49152) + the SmolLM2 tokenizer (ChatML template)."""
    import gguf

    import medjax
    from medjax.models import get_preset, init_decoder
    from medjax.hf.gguf_vocab import read_tokenizer
    cfg = dataclasses.replace(get_preset("tiny-llama3"), vocab_size=49152, bos_token_id=1,
                              eos_token_id=2, max_position_embeddings=512)
    tokenizer = read_tokenizer(gguf.GGUFReader(gguf_path))
    medjax.save_hf(init_decoder(cfg, seed=0), out, tokenizer=tokenizer)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """``DrainingServer`` on a thread (uvicorn installs no signal handlers off the main thread):
    ``url``, ``engine``, ``stop()``."""

    def __init__(self, model_dir, name="tiny", warmup=True, **engine_kw):
        import uvicorn

        import medjax
        from medjax.serve.app import DrainingServer, ServedModel, create_app
        from medjax.serve.engine import Engine, EngineConfig
        self.model, self.tokenizer = medjax.load(model_dir, progress=False)
        self.engine = Engine(self.model, EngineConfig(**{**SERVE_KW, **engine_kw}))
        if warmup:
            self.engine.warmup()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(create_app(ServedModel(self.engine, self.tokenizer, name)),
                                host="127.0.0.1", port=self.port, log_level="warning")
        self.server = DrainingServer(config, self.engine)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
