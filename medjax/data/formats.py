"""Record → rendered text with the character spans the loss is computed on.

Every format renders to ``Rendered(text, spans, add_bos, add_eos)``: ``spans`` are the
``[start, end)`` character ranges whose tokens are scored (the response / assistant turns; the
whole text for ``text``). Tokenizing the full string once and marking tokens by their offsets
gives the same ids ``transformers`` produces for the whole string (``apply_chat_template(...,
tokenize=True)``), with no seams where prompt and response were encoded separately.

Chat spans come from the template itself: the text an assistant turn adds is
``render(messages[:i+1])`` minus ``render(messages[:i], add_generation_prompt=True)``, so the mask
covers exactly what the template emits for that turn (its content and end-of-turn marker), for
any template.
"""
from __future__ import annotations

import string
from typing import Any, NamedTuple

from medjax.errors import FieldError

DEFAULT_FIELDS = {name: name for name in (
    "text", "instruction", "input", "output", "messages", "role", "content", "question", "options",
    "answer", "contexts", "prompt", "chosen", "rejected", "system")}

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
MCQA_INSTRUCTION = "Answer the following multiple-choice question with the letter and text of the correct option."


CHAT_ROLES = ("system", "user", "assistant", "tool")


class Rendered(NamedTuple):
    text: str
    spans: tuple  # ((start, end), ...) character ranges that are scored
    add_bos: bool
    add_eos: bool


class Renderer:
    """Turns records of one format into ``Rendered`` text (a pair of them for ``preference``)."""

    def __init__(self, fmt: str, tokenizer, *, fields: dict | None = None, prompt_style: str = "alpaca",
                 chat_template: str | None = None, system_prompt: str | None = None,
                 train_on_prompt: bool = False):
        self.format, self.tokenizer = fmt, tokenizer
        self.fields = dict(DEFAULT_FIELDS, **(fields or {}))
        self.prompt_style, self.chat_template = prompt_style, chat_template
        self.system_prompt, self.train_on_prompt = system_prompt, train_on_prompt

    # ---- field access
    def get(self, record: dict, name: str, kinds=(str,), required: bool = True):
        key = self.fields[name]
        if not isinstance(record, dict):
            raise FieldError(f"expected a JSON object, got {type(record).__name__}")
        if key not in record or record[key] is None:
            if required:
                raise FieldError(f"missing field {key!r} ({self.format} format); record has {sorted(record)}")
            return None
        value = record[key]
        if not isinstance(value, kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise FieldError(f"field {key!r} must be {names}, got {type(value).__name__}")
        return value

    # ---- entry points
    def check(self, record: dict) -> None:
        """Raise ``FieldError`` for a malformed record, without rendering chat templates."""
        if self.format == "chat":
            messages = self._messages(self.get(record, "messages", (list,)))
            if not any(m["role"] == "assistant" for m in messages):
                raise FieldError(f"field {self.fields['messages']!r} has no assistant turn to train on")
        elif self.format == "preference":
            prompt = self.get(record, "prompt", (str, list))
            if isinstance(prompt, list):
                self._messages(prompt, field="prompt")
            self._response(record, "chosen"), self._response(record, "rejected")
        elif self.format == "alpaca" and self.prompt_style == "chat":
            self.get(record, "instruction"), self.get(record, "output"), self.get(record, "input", required=False)
        elif self.format == "mcqa" and self.prompt_style == "chat":
            self._mcqa(record)
        else:
            self.render(record)

    def render(self, record: dict) -> dict[str, Rendered]:
        """``{"": Rendered}`` for single-sequence formats, ``{"chosen_": .., "rejected_": ..}``."""
        if self.format == "preference":
            prompt = self.get(record, "prompt", (str, list))
            return {"chosen_": self._prompt_response(prompt, self._response(record, "chosen")),
                    "rejected_": self._prompt_response(prompt, self._response(record, "rejected"))}
        if self.format == "text":
            text = self.get(record, "text")
            if not text.strip():
                raise FieldError(f"field {self.fields['text']!r} is empty")
            return {"": Rendered(text, ((0, len(text)),), self.tokenizer.add_bos_token, True)}
        if self.format == "alpaca":
            instruction = self.get(record, "instruction")
            extra = self.get(record, "input", required=False) or ""
            return {"": self._prompt_response(self._user_text(instruction, extra), self.get(record, "output"),
                                              alpaca=(instruction, extra))}
        if self.format == "mcqa":
            question_block, answer = self._mcqa(record)
            return {"": self._prompt_response(f"{MCQA_INSTRUCTION}\n\n{question_block}", answer,
                                              alpaca=(MCQA_INSTRUCTION, question_block))}
        if self.format == "chat":
            return {"": self._chat(self._messages(self.get(record, "messages", (list,))), require_assistant=True)}
        raise FieldError(f"unknown format {self.format!r}")

    # ---- pieces
    def _user_text(self, instruction: str, extra: str) -> str:
        return f"{instruction}\n\n{extra}" if extra else instruction

    def _response(self, record, name) -> str:
        value = self.get(record, name, (str, list))
        if isinstance(value, list):  # a conversation: score its last assistant turn
            turns = [m for m in self._messages(value, field=name) if m["role"] == "assistant"]
            if not turns:
                raise FieldError(f"field {self.fields[name]!r} has no assistant turn")
            value = turns[-1]["content"]
        return value

    def _messages(self, messages: list, field: str = "messages") -> list[dict]:
        role_key, content_key = self.fields["role"], self.fields["content"]
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get(role_key), str) \
                    or not isinstance(message.get(content_key), str):
                raise FieldError(f"field {self.fields[field]!r}[{i}] must be an object with string "
                                 f"{role_key!r} and {content_key!r}")
            if message[role_key] not in CHAT_ROLES:
                raise FieldError(f"field {self.fields[field]!r}[{i}] has unknown role "
                                 f"{message[role_key]!r} (expected one of {', '.join(CHAT_ROLES)})")
            out.append({"role": message[role_key], "content": message[content_key]})
        if not out:
            raise FieldError(f"field {self.fields[field]!r} is an empty conversation")
        return out

    def _prompt_response(self, prompt, response: str, alpaca=None) -> Rendered:
        """A prompt (text or turns) answered by ``response``, in the configured prompt style."""
        if isinstance(prompt, list):
            messages = self._messages(prompt, field="prompt")
        elif self.prompt_style == "alpaca":
            instruction, extra = alpaca if alpaca is not None else (prompt, "")
            template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT
            text = template.format(instruction=instruction, input=extra)
            if self.system_prompt:
                text = f"{self.system_prompt}\n\n{text}"
            spans = ((0, len(text) + len(response)),) if self.train_on_prompt else (
                (len(text), len(text) + len(response)),)
            return Rendered(text + response, spans, self.tokenizer.add_bos_token, True)
        else:
            messages = [{"role": "user", "content": prompt}]
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return self._chat(messages + [{"role": "assistant", "content": response}], last_only=True)

    def _chat(self, messages: list[dict], require_assistant=False, last_only=False) -> Rendered:
        render = self.tokenizer.apply_chat_template
        kwargs = {"chat_template": self.chat_template}
        full = render(messages, **kwargs)
        indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if require_assistant and not indices:
            raise FieldError(f"field {self.fields['messages']!r} has no assistant turn to train on")
        if last_only:
            indices = indices[-1:]
        spans, cursor = [], 0
        for i in indices:
            before = render(messages[:i], add_generation_prompt=True, **kwargs)
            through = render(messages[: i + 1], **kwargs)
            if through.startswith(before) and full.startswith(through):
                start, end = len(before), len(through)
            else:  # template rewrites earlier turns: find the content itself
                start = full.find(messages[i]["content"].strip(), cursor)
                if start < 0:
                    raise FieldError(f"chat template drops the content of message {i}")
                end = start + len(messages[i]["content"].strip())
            spans.append((start, end))
            cursor = end
        if self.train_on_prompt:
            spans = [(0, len(full))]
        return Rendered(full, tuple(spans), False, False)

    def _mcqa(self, record: dict) -> tuple[str, str]:
        question = self.get(record, "question")
        options = self.get(record, "options", (dict, list))
        if isinstance(options, dict):
            letters, texts = list(options), [str(v) for v in options.values()]
        else:
            letters = list(string.ascii_uppercase[: len(options)])
            texts = [_strip_letter(str(t), letter) for t, letter in zip(options, letters)]
        if len(texts) < 2:
            raise FieldError(f"field {self.fields['options']!r} needs at least 2 options")
        answer = self.get(record, "answer", (str, int))
        index = _answer_index(answer, letters, texts)
        if index is None:
            raise FieldError(f"field {self.fields['answer']!r} = {answer!r} matches no option "
                             f"(letters {letters}, 0-based index, or option text)")
        contexts = self.get(record, "contexts", (list, str), required=False)
        lines = []
        if contexts:
            lines.append("Context: " + (contexts if isinstance(contexts, str) else "\n".join(map(str, contexts))))
        lines.append(f"Question: {question}")
        lines += [f"{letter}. {text}" for letter, text in zip(letters, texts)]
        return "\n".join(lines), f"{letters[index]}. {texts[index]}"


def _strip_letter(text: str, letter: str) -> str:
    """``"A. text"`` → ``"text"`` (MedMCQA mirrors keep the letter in the option)."""
    for sep in (". ", ") ", ": "):
        if text.startswith(letter + sep):
            return text[len(letter) + len(sep):]
    return text


def _answer_index(answer: Any, letters: list, texts: list) -> int | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(texts) else None
    if answer in letters:
        return letters.index(answer)
    if answer.strip() in texts:
        return texts.index(answer.strip())
    return None
