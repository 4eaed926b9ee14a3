"""Writing output files whole, with the permissions the user's umask gives.

Every file medjax writes for the user (exports, GGUF, reports, tokenizer files) appears all at
once: it is written to a temp file or directory beside its target and renamed over it when
complete, so a crash never leaves half a file under the real name. ``tempfile`` creates those
temps private (files 0600, directories 0700) whatever the umask (and ``safetensors.save_file``
creates its file 0600: medjax writes safetensors with ``hf.safetensors_io.write_safetensors``,
a plain ``open()``); a rename keeps them private: on a shared cluster nobody else could read
an export. Each file and directory here is therefore set to the mode a plain ``open()`` /
``mkdir()`` would have given it (0666 / 0777 minus the umask).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode ``open()`` (0666) or ``mkdir()`` (0777) gives a new file or directory."""
    return (0o777 if directory else 0o666) & ~current_umask()


def temp_file_beside(path: str | os.PathLike) -> tuple[int, Path]:
    """``(fd, temp_path)``: a new file in ``path``'s directory, named ``.<name>.tmp-*``, with the
    umask's mode; ``os.replace(temp_path, path)`` it when complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.fchmod(fd, umask_mode())
    return fd, Path(tmp)


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new directory in ``path``'s parent, named ``.<name>.tmp-*``, with the umask's mode."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, umask_mode(directory=True))
    return tmp


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Put the complete directory ``tmp`` at ``path``: an existing ``path`` is moved aside, replaced
    by ``tmp`` in one rename, then removed (a crash in between leaves ``.<name>.old``, never half)."""
    tmp, path = Path(tmp), Path(path)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def write_file(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` whole: temp file, then rename over ``path``."""
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
