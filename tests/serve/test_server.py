"""The HTTP server through the official ``openai`` client on localhost."""
from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest

from medjax.eval.generate import Generator, strip_stop

CHAT = [{"role": "user", "content": "What is the first-line treatment for anaphylaxis?"}]


def greedy_reference(server, prompt_ids, max_tokens):
    """What python -m medjax.generate prints for these ids (its Generator, its stop ids)."""
    tok = server.tokenizer
    ids = Generator(server.model).generate([prompt_ids], max_new_tokens=max_tokens,
                                           stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
    return tok.decode(strip_stop(ids, tok.stop_ids)), ids


def post(server, path, raw: bytes):
    req = urllib.request.Request(server.url + path, data=raw, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_completion_and_chat_equal_generate(server, client):
    tok = server.tokenizer
    out = client.completions.create(model="tiny", prompt="Aspirin inhibits", max_tokens=9, temperature=0)
    text, ids = greedy_reference(server, tok.encode("Aspirin inhibits", add_special_tokens=True), 9)
    assert out.choices[0].text == text
    assert out.usage.completion_tokens == len(ids) == 9 and out.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=7, temperature=0)
    prompt = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True))
    assert chat.choices[0].message.content == greedy_reference(server, prompt, 7)[0]
    assert chat.usage.prompt_tokens == len(prompt)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_equals_the_whole_answer(server, client):
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Aspirin", max_tokens=6, temperature=0, stream=True))
    assert streamed == client.completions.create(model="tiny", prompt="Aspirin", max_tokens=6,
                                                 temperature=0).choices[0].text


def test_stop_strings_n_and_seed(server, client):
    free = client.completions.create(model="tiny", prompt="Aspirin", max_tokens=12, temperature=0)
    text = free.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.completions.create(model="tiny", prompt="Aspirin", max_tokens=12, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    kw = dict(model="tiny", prompt="Aspirin", max_tokens=8, temperature=1.0, top_p=0.95,
              extra_body={"top_k": 40})
    a = client.completions.create(n=3, seed=5, **kw)
    b = client.completions.create(n=3, seed=5, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1 and sorted(c.index for c in a.choices) == [0, 1, 2]


@pytest.mark.parametrize("body,status,message", [
    (b'{"prompt": "x", "max_tokens": 3', 400, "malformed JSON"),
    (b'[1, 2]', 400, "must be an object"),
    (b'{"model": "gpt-4", "prompt": "x"}', 404, "model 'gpt-4' not found"),
    (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens must be >= 1"),
    (b'{"prompt": "x", "max_tokens": -5}', 400, "max_tokens must be >= 1"),
    (b'{"prompt": "x", "temperature": "hot"}', 400, "temperature must be a number"),
    (json.dumps({"prompt": "word " * 400, "max_tokens": 4}).encode(), 400, "exceeds the context"),
])
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(server, client, body, status, message):
    code, answer = post(server, "/completions", body)
    assert code == status and message in answer["error"]["message"]
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices[0].text is not None


def test_client_disconnect_mid_stream_frees_its_pages(server, client):
    engine = server.engine
    stream = client.completions.create(model="tiny", prompt="Aspirin", max_tokens=200, temperature=0,
                                       stream=True)
    next(iter(stream))
    next(iter(stream))
    stream.close()                                     # the client goes away mid-stream
    for _ in range(200):
        if not engine.running and engine.allocator.free == engine.allocator.num_pages:
            break
        threading.Event().wait(0.05)
    assert not engine.running and engine.allocator.free == engine.allocator.num_pages
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens == 2


def test_raw_socket_hangup_mid_stream(server, client):
    body = json.dumps({"prompt": "Aspirin", "max_tokens": 200, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert b"200" in s.recv(100)
    for _ in range(200):
        if not server.engine.running:
            break
        threading.Event().wait(0.05)
    assert not server.engine.running
    assert client.models.list().data
