"""User errors at the command line: one line ``error: <message>`` on stderr, exit code 2.

Every ``python -m medjax.X`` entry point ends with ``sys.exit(run_cli(main))``. A *user* error
(a bad config key, a corrupt checkpoint, a malformed data line, an unknown eval task, a path
that does not exist, a full disk) is printed as a single line naming the culprit and the
process exits with status 2, without a traceback: the message is the whole story. Anything
else is a bug in medjax and keeps its traceback. ``MEDJAX_TRACEBACK=1`` shows the traceback
for user errors too (for bug reports).

User errors are the ``medjax.errors.UserError`` family (``ConfigError``, ``DataError``,
``CheckpointError``) plus the ``OSError``s that describe the user's files or machine.
``medjax.errors`` imports nothing, so this module costs nothing at start-up.
"""
from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager

from medjax.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# OSErrors that describe the user's files or machine rather than a bug.
_USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENOSPC,
                errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EEXIST}


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
        return True
    return isinstance(exc, UserError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (OSErrors as ``<reason>: <path>``)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None:
            text += f": {exc.filename}"
        if getattr(exc, "filename2", None) is not None:
            text += f" -> {exc.filename2}"
    else:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, KeyError) and text.startswith(("'", '"')):
            text = text[1:-1]
    return " ".join(text.split())


def _close_progress_bars() -> None:
    """A bar left open by the exception would put the error line after its text."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 — cosmetic only
            pass


@contextmanager
def user_errors():
    """Turn user errors raised inside the block into ``error: ...`` + ``SystemExit(2)``."""
    try:
        yield
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as exc:  # noqa: BLE001 — filtered just below
        if not is_user_error(exc) or os.environ.get("MEDJAX_TRACEBACK"):
            raise
        _close_progress_bars()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def run_cli(main, argv=None) -> int:
    """``main(argv)`` under :func:`user_errors`; returns the exit status for ``sys.exit``."""
    try:
        with user_errors():
            status = main(argv)
    except SystemExit as e:
        code = e.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            return 1
        return 0 if code is None else int(code)
    return 0 if status is None else int(status)
