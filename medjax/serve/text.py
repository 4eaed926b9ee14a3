"""Token ids → text deltas for one choice, with OpenAI ``stop`` strings.

The whole tail is decoded again at every token (a multi-byte character may span tokens; a
partial one decodes to U+FFFD and is held back). Text that could still become the start of a
stop string is held back too, so a stop string never reaches the client.
"""
from __future__ import annotations

from typing import Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token: ``(new text safe to send, stop string hit)``."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        end = len(self.text.rstrip("\ufffd")) - self.hold
        return self._take(end), False

    def flush(self) -> str:
        """Everything not yet sent (the sequence ended without a stop string)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out
