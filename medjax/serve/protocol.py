"""OpenAI request bodies → validated ``GenerationRequest``s; bad input → ``ApiError`` (4xx)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from medjax.errors import UserError

MAX_N = 16
MAX_STOP = 4


class ApiError(Exception):
    """An HTTP error answer: ``status`` and a message for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


@dataclass
class GenerationRequest:
    prompts: list[list[int]]          # one per prompt (chat: one)
    max_tokens: int | None            # None: app.DEFAULT_MAX_TOKENS, within the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    def choice_seed(self) -> int:
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object")
    return body


def check_model(body: dict, served: str) -> None:
    name = body.get("model")
    if name is not None and name != served:
        raise ApiError(404, f"model {name!r} not found; this server serves {served!r}",
                       kind="model_not_found", param="model")


def _number(body, key, default, lo, hi, *, integer=False, lo_open=False):
    value = body.get(key)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool):
        raise ApiError(400, f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}",
                       param=key)
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        bound = f"{'>' if lo_open else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
        raise ApiError(400, f"{key} must be {bound}, got {value!r}", param=key)
    return value


def _stop(body) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > MAX_STOP:
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP} strings",
                       param="stop")
    return stop


def sampling_fields(body: dict, *, max_tokens_keys=("max_tokens",), default_max_tokens=None) -> dict:
    max_tokens = default_max_tokens
    for key in max_tokens_keys:
        if body.get(key) is not None:
            max_tokens = _number(body, key, None, 1, None, integer=True)
    top_k = _number(body, "top_k", 0, -1, None, integer=True)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, f"seed must be an integer, got {seed!r}", param="seed")
    return dict(max_tokens=max_tokens,
                temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
                top_k=max(0, top_k), seed=seed,
                n=_number(body, "n", 1, 1, MAX_N, integer=True), stop=_stop(body), stream=stream,
                include_usage=bool(stream_options.get("include_usage", False)))


def completion_request(body: dict, tokenizer) -> GenerationRequest:
    """``/v1/completions``: the prompt as ``medjax.generate`` encodes it (special tokens added)."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise ApiError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
    ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    return GenerationRequest(ids, **sampling_fields(body, default_max_tokens=16))


def _message_text(content, i) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param="messages")


def chat_request(body: dict, tokenizer) -> GenerationRequest:
    """``/v1/chat/completions``: the model's chat template with the generation prompt."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", param="messages")
        turns.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
    except UserError as e:          # the template's raise_exception(...) on the client's turns
        raise ApiError(400, f"the chat template rejected the messages: {e}",
                       param="messages") from None
    fields = sampling_fields(body, max_tokens_keys=("max_tokens", "max_completion_tokens"))
    return GenerationRequest([tokenizer.encode(text)], **fields)
