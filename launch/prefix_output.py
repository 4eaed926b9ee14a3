"""Prefix every line of a process's output as it arrives (launch/local_multiprocess.sh).

    COMMAND 2>&1 | python3 launch/prefix_output.py "[p0] " --progress

Lines end with ``\\n`` or ``\\r`` (a progress bar redraws itself after ``\\r``): each is written,
prefixed, as soon as it is complete, and with ``--progress`` a bar being redrawn (the text after
a ``\\r``) is shown as it grows. Without ``--progress`` (every process but 0) progress-bar text is
dropped, so one bar shows. gloo's ``[Gloo] Rank N is connected to M peer ranks`` lines are
dropped.
"""
from __future__ import annotations

import os
import re
import sys

GLOO = re.compile(rb"\[Gloo\] Rank \d+ is connected to \d+ peer ranks[^\r\n]*(?:\r\n|\r|\n)?")
SEGMENT = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)")
MARK = b"[Gloo]"


def _held_back(text: bytes) -> int:
    """Where the part of ``text`` that may be the start of a gloo line begins (len: none)."""
    at = text.find(b"[Gloo")
    if at >= 0:
        return at
    for n in range(min(len(MARK) - 1, len(text)), 0, -1):     # ends with "[", "[G", ... "[Gloo"
        if text.endswith(MARK[:n]):
            return len(text) - n
    return len(text)


class Prefixer:
    def __init__(self, prefix: bytes, progress: bool):
        self.prefix, self.progress = prefix, progress
        self.tail = b""          # the unfinished segment
        self.shown = 0           # bytes of it already written (a bar as it grows)
        self.in_bar = False      # the previous segment ended with \r: this one is a bar's end

    def _segment(self, seg: bytes) -> bytes:
        """A complete segment (ending in \r or \n, or the last bytes at exit)."""
        shown, self.shown = self.shown, 0
        bar, self.in_bar = self.in_bar or seg.endswith(b"\r"), seg.endswith(b"\r")
        rest = GLOO.sub(b"", seg[shown:])        # gloo's line, also when it lands inside a bar
        if shown:
            return rest
        if not rest or (bar and not self.progress):
            return b""
        return rest if rest == b"\r" else self.prefix + rest     # a bare \r needs no prefix

    def feed(self, chunk: bytes) -> bytes:
        """The output for ``chunk`` (may be empty)."""
        data, out, end = self.tail + chunk, [], 0
        for m in SEGMENT.finditer(data):
            out.append(self._segment(m.group()))
            end = m.end()
        self.tail = data[end:]
        # a progress bar (text after \r) is shown as it grows, never a gloo line's start; any other
        # unfinished line waits for its end, so another process's line cannot land inside it
        if self.tail and self.progress and self.in_bar:
            upto = self.shown + _held_back(self.tail[self.shown:])
            if upto > self.shown:
                out.append((b"" if self.shown else self.prefix) + self.tail[self.shown:upto])
                self.shown = upto
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
