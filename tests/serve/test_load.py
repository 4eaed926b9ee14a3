"""64 concurrent clients, overload (429) and SIGTERM drain."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medjax.eval.generate import Generator, strip_stop

ROOT = Path(__file__).resolve().parents[2]
WORDS = "fever cough aspirin dose renal patient acute chronic insulin sepsis".split()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def mixed_prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(1, 120, size=n)]


def test_64_concurrent_clients_get_generates_answers_in_flat_memory(server, client):
    tok, max_tokens = server.tokenizer, 8
    prompts = mixed_prompts(64)
    ids = [tok.encode(p, add_special_tokens=True) for p in prompts]
    assert len({len(i) for i in ids}) > 20
    ref = Generator(server.model).generate(ids, max_new_tokens=max_tokens, stop_ids=tok.stop_ids,
                                           pad_id=tok.pad_id)
    want = [tok.decode(strip_stop(r, tok.stop_ids)) for r in ref]

    def ask(p):
        return client.completions.create(model="tiny", prompt=p, max_tokens=max_tokens,
                                         temperature=0).choices[0].text
    programs = server.engine.compiled_programs()
    with ThreadPoolExecutor(64) as pool:
        assert list(pool.map(ask, prompts)) == want          # round 1 (allocator, sockets warm)
        before = rss_mib()
        for _ in range(2):
            assert list(pool.map(ask, prompts)) == want
        after = rss_mib()
    assert after - before < 40, f"RSS grew {after - before:.1f} MiB over 128 requests"
    assert server.engine.compiled_programs() == programs
    assert server.engine.allocator.free == server.engine.allocator.num_pages


def test_beyond_the_queue_is_429(tiny_model_dir):
    import openai
    from serve.serve_helpers import ServerThread
    srv = ServerThread(tiny_model_dir, warmup=False, max_queue=2, max_slots=1)
    try:
        client = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=60)

        def ask(_):
            try:
                client.completions.create(model="tiny", prompt="fever", max_tokens=40)
                return 200
            except openai.RateLimitError as e:
                assert "queue is full" in str(e)
                return 429
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(ask, range(12)))
        assert 429 in codes and 200 in codes
        assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices
    finally:
        srv.stop()


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "medjax.serve", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_startup_errors_are_one_line_exit_2(tmp_path):
    proc = _cli("--model", str(tmp_path / "missing"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert [line for line in out.splitlines() if line.startswith("error:")] == \
        [f"error: {tmp_path / 'missing'}: no such file or directory"]


def test_sigterm_drains_requests_in_flight(tiny_model_dir):
    import signal

    import openai
    from serve.serve_helpers import free_port
    port = free_port()
    proc = _cli("--model", str(tiny_model_dir), "--name", "tiny", "--port", str(port),
                "--max-context", "64", "--kv-memory", "0.01", "--max-slots", "2", "--no-warmup")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=120)
        deadline = time.time() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        stream = client.completions.create(model="tiny", prompt="fever", max_tokens=40,
                                           temperature=0, stream=True)
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)                 # mid-generation
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Finished server process" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
