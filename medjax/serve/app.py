"""The OpenAI-compatible HTTP app (starlette): completions, chat completions, models, health.

Each choice of a request is one engine ``Sequence``; the engine thread hands its tokens to the
request's event loop (``call_soon_threadsafe``), ``TextStream`` turns them into text with the
stop strings applied. A client that goes away mid-stream cancels its sequences (their pages are
freed at the next engine step); every other request keeps going.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from medjax.errors import ConfigError
from medjax.serve.engine import Draining, Engine, QueueFull, Sampling, Sequence
from medjax.serve.protocol import (ApiError, GenerationRequest, chat_request, check_model,
                                   completion_request, parse_json)
from medjax.serve.text import TextStream

log = logging.getLogger("medjax.serve")
# A chat request without max_tokens: its pages are reserved at admission, so "up to the context"
# would hold a whole context of pages per request.
DEFAULT_MAX_TOKENS = 512


class EngineFailed(Exception):
    """The engine step running this choice raised (logged); the request answers 500."""


class Choice:
    """One choice: engine tokens → ``(text delta, finish_reason | None)`` on the event loop."""

    def __init__(self, engine: Engine, tokenizer, prompt, req: GenerationRequest, index: int,
                 seed: int, loop):
        self.index, self.engine, self.loop = index, engine, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(tokenizer, req.stop)
        self.stop_ids = frozenset(tokenizer.stop_ids)
        max_tokens = req.max_tokens or max(1, min(DEFAULT_MAX_TOKENS, engine.max_context - len(prompt)))
        self.seq = Sequence(prompt=prompt, max_tokens=max_tokens, emit=self._emit,
                            stop_ids=self.stop_ids,
                            sampling=Sampling(req.temperature, req.top_k, req.top_p, seed, index))
        self.completion_tokens = 0

    def _emit(self, token, finish):         # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (token, finish))

    async def deltas(self):
        while True:
            token, finish = await self.queue.get()
            if finish == "error":
                raise EngineFailed("the engine failed on this request (see the server log)")
            if token is not None:
                self.completion_tokens += 1
            delta, hit = ("", False) if token is None or token in self.stop_ids else self.text.push(token)
            if hit:
                self.engine.cancel(self.seq)
                yield delta, "stop"
                return
            if finish is not None:
                yield delta + self.text.flush(), finish
                return
            if delta:
                yield delta, None


@dataclass
class ServedModel:
    engine: Engine
    tokenizer: object
    name: str
    created: int = 0


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _start(served: ServedModel, request: Request, parse) -> tuple[GenerationRequest, list[Choice]]:
    body = parse_json(await request.body())
    check_model(body, served.name)
    req = parse(body, served.tokenizer)
    loop = asyncio.get_running_loop()
    seed = req.choice_seed()
    choices = [Choice(served.engine, served.tokenizer, prompt, req, p * req.n + i, seed, loop)
               for p, prompt in enumerate(req.prompts) for i in range(req.n)]
    try:
        served.engine.submit([c.seq for c in choices])
    except ConfigError as e:           # a request that can never run (context, pool)
        raise ApiError(400, str(e), param="max_tokens") from None
    except QueueFull as e:
        raise ApiError(429, str(e), kind="rate_limit_exceeded") from None
    except Draining as e:
        raise ApiError(503, str(e), kind="service_unavailable") from None
    return req, choices


def _usage(req: GenerationRequest, choices) -> dict:
    prompt = sum(len(p) for p in req.prompts)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _cancel(engine: Engine, choices) -> None:
    for c in choices:
        if not c.seq.finished:
            engine.cancel(c.seq)


def _endpoint(served: ServedModel, parse, chat: bool):
    obj = "chat.completion" if chat else "text_completion"

    def choice_body(index, text, finish, *, chunk, first=False):
        if not chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        key = "delta" if chunk else "message"
        message = {"content": text} if chunk else {"role": "assistant", "content": text}
        if chunk and first:
            message = {"role": "assistant", "content": text}
        return {"index": index, key: message, "logprobs": None, "finish_reason": finish}

    async def handler(request: Request):
        try:
            req, choices = await _start(served, request, parse)
        except ApiError as e:
            return _error(e)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": served.name}
        if req.stream:
            return StreamingResponse(_stream(req, choices, head), media_type="text/event-stream")
        try:
            texts = await asyncio.gather(*(_collect(c) for c in choices))
        except EngineFailed as e:
            return _error(ApiError(500, str(e), kind="server_error"))
        finally:
            _cancel(served.engine, choices)
        body = dict(head, object=obj, usage=_usage(req, choices),
                    choices=[choice_body(c.index, text, finish, chunk=False)
                             for c, (text, finish) in zip(choices, texts)])
        return JSONResponse(body)

    async def _stream(req, choices, head):
        merged: asyncio.Queue = asyncio.Queue()
        first = {c.index: True for c in choices}

        async def pump(c):
            try:
                async for delta, finish in c.deltas():
                    await merged.put((c.index, delta, finish))
            except EngineFailed as e:
                await merged.put((c.index, None, str(e)))
        tasks = [asyncio.create_task(pump(c)) for c in choices]
        chunk_obj = obj + ".chunk" if chat else obj
        try:
            open_choices = len(choices)
            while open_choices:
                index, delta, finish = await merged.get()
                if delta is None:       # engine error: say so in the stream, then end it
                    yield _sse({"error": {"message": finish, "type": "server_error"}})
                    return
                open_choices -= finish is not None
                body = dict(head, object=chunk_obj,
                            choices=[choice_body(index, delta, finish, chunk=True, first=first[index])])
                first[index] = False
                yield _sse(body)
            if req.include_usage:
                yield _sse(dict(head, object=chunk_obj, choices=[], usage=_usage(req, choices)))
            yield "data: [DONE]\n\n"
        finally:                        # also on client disconnect (the task is cancelled)
            _cancel(served.engine, choices)
            for t in tasks:
                t.cancel()

    return handler


async def _collect(choice: Choice) -> tuple[str, str]:
    parts, finish = [], None
    async for delta, finish in choice.deltas():
        parts.append(delta)
    return "".join(parts), finish


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def create_app(served: ServedModel) -> Starlette:
    """The app; its lifespan starts the engine thread and, on shutdown, lets it finish."""
    served.created = served.created or int(time.time())

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": served.name, "object": "model", "created": served.created,
             "owned_by": "medjax", "max_model_len": served.engine.max_context}]})

    async def health(request: Request):
        engine = served.engine
        status = 503 if engine.draining else 200
        return JSONResponse({"status": "draining" if engine.draining else "ok",
                             "running": len(engine.running), "waiting": len(engine.waiting),
                             "free_pages": engine.allocator.free}, status_code=status)

    @asynccontextmanager
    async def lifespan(app):
        served.engine.start()
        yield
        await asyncio.to_thread(served.engine.stop)

    return Starlette(routes=[
        Route("/v1/completions", _endpoint(served, completion_request, chat=False), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(served, chat_request, chat=True), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], lifespan=lifespan)


class DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown (requests in flight finish, then the lifespan ends the engine)
    with the engine refusing new requests (503) from the moment SIGTERM/SIGINT arrives."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame):
        self.engine.drain()
        super().handle_exit(sig, frame)
