"""Prefix every line of a process's output as it arrives (launch/local_multiprocess.sh).

    COMMAND 2>&1 | python3 launch/prefix_output.py "[p0] " --progress

Lines end with ``\\n`` or ``\\r`` (a progress bar redraws itself after ``\\r``): each is written,
prefixed, as soon as it is complete, and with ``--progress`` an unfinished bar is shown as it
grows. Without ``--progress`` (every process but 0) progress-bar text is dropped, so one bar shows.
gloo's ``[Gloo] Rank N is connected to M peer ranks`` lines are dropped.
"""
from __future__ import annotations

import os
import re
import sys

GLOO = re.compile(rb"\[Gloo\] Rank \d+ is connected to \d+ peer ranks")
SEGMENT = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)")


class Prefixer:
    def __init__(self, prefix: bytes, progress: bool):
        self.prefix, self.progress = prefix, progress
        self.tail = b""          # the unfinished segment
        self.shown = 0           # bytes of it already written (a bar as it grows)
        self.in_bar = False      # the previous segment ended with \r: this one is a bar's end

    def _maybe_gloo(self, text: bytes) -> bool:
        return text.startswith(b"[Gloo]"[:len(text)]) or text.startswith(b"[Gloo]")

    def _segment(self, seg: bytes) -> bytes:
        shown, self.shown = self.shown, 0
        bar, self.in_bar = self.in_bar or seg.endswith(b"\r"), seg.endswith(b"\r")
        if shown:
            return seg[shown:]
        if GLOO.match(seg) or (bar and not self.progress):
            return b""
        return self.prefix + seg

    def feed(self, chunk: bytes) -> bytes:
        """The output for ``chunk`` (may be empty)."""
        data, out, end = self.tail + chunk, [], 0
        for m in SEGMENT.finditer(data):
            out.append(self._segment(m.group()))
            end = m.end()
        self.tail = data[end:]
        if self.tail and self.progress and not self._maybe_gloo(self.tail):
            out.append(self.tail[self.shown:] if self.shown else self.prefix + self.tail)
            self.shown = len(self.tail)
        return b"".join(out)

    def close(self) -> bytes:
        return self._segment(self.tail) if self.tail else b""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = Prefixer(argv[0].encode(), "--progress" in argv[1:])
    while chunk := os.read(0, 1 << 16):
        os.write(1, p.feed(chunk))
    os.write(1, p.close())
    return 0


if __name__ == "__main__":
    sys.exit(main())
