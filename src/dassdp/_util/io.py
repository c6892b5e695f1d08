"""Atomic file writes: a temporary file in the same folder, flushed, then renamed over the
target, so a reader (or a resumed run) never sees a half-written file.

A write that fails (disk full, ``ulimit -f``, no permission) raises :class:`WriteError`: an
``OSError`` with the errno whose message is one line naming the target path and what went
wrong ("no space left writing runs/x/last.pt; the previous file (if any) is intact"), not the temp
file's name or, for data written by a library such as ``torch.save``, its own words.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


class WriteError(OSError):
    """Writing ``filename`` failed: ``errno``, ``strerror`` and ``filename`` as for any
    ``OSError`` (the cause's, with the target's path); ``str()`` is the one-line message
    (see the module)."""

    def __init__(self, code: int, strerror: str, filename: str, message: str) -> None:
        super().__init__(code, strerror, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


# errno -> what it means for a file being written
_WRITE_REASONS = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded (ulimit -f)",
}


def write_error(
    err: BaseException, path: str | os.PathLike, unchanged: bool = True
) -> WriteError | None:
    """The :class:`WriteError` for ``err`` raised while writing ``path`` (an ``OSError``, or
    an error with one in its ``__cause__`` / ``__context__`` chain, as ``torch.save`` raises
    its ``RuntimeError`` "unexpected pos"); None when no ``OSError`` is behind it.
    ``unchanged``: the write was atomic, so the message says ``path`` is as it was."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, OSError):
        return None
    if isinstance(cause, WriteError):
        return cause
    reason = _WRITE_REASONS.get(cause.errno or 0)
    if reason is not None:
        message = f"{reason} writing {path}"
    else:
        message = f"cannot write {path}: {(cause.strerror or str(cause)).lower()}"
    message += "; the previous file (if any) is intact" if unchanged else ""
    code = cause.errno or errno.EIO
    return WriteError(code, cause.strerror or str(cause), str(path), message)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temp file next to ``path`` for binary writing; on success it is flushed, synced
    and renamed onto ``path``; on any error it is removed and ``path`` is left untouched (a
    failed write of the file itself is a :class:`WriteError` naming ``path``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as err:
        raise write_error(err, path) from err  # type: ignore[misc]
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        failure = write_error(err, path) if isinstance(err, OSError | RuntimeError) else None
        if failure is None:
            raise
        raise failure from err


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, exclusive temp file next to ``path``. Unlike ``tempfile.mkstemp`` (mode 0600) it
    is created with mode 0666 minus the umask, as ``open()`` would create ``path`` itself."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")
