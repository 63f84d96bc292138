"""Atomic file writes: a temp file in the same directory, then os.replace.

Nothing the user owns is ever half-written: a crash, Ctrl-C or a full disk
leaves either the old file or the new one, plus at most a hidden
``.NAME.*.tmp`` that the next write of the same name does not depend on.
A failed write raises WriteError (an OSError) naming the file and saying that
the previous version is intact.

Permissions are those of a plain open(): a new file gets 0666 & ~umask, a
replaced file keeps its mode (mkstemp alone would give 0600).

Symlinks are never written through: the temp file is created with O_EXCL
(mkstemp) and os.replace renames it over the name itself, so a symlink of
that name is replaced by the new file and its target is left alone.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


class WriteError(OSError):
    """Writing `path` failed; the file as it was before (if any) is unchanged."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]"
        return str(self.strerror)


def _umask_from_proc() -> int | None:
    # Linux >= 4.7 reports the umask without changing it (os.umask can only read it by setting it).
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _umask_by_setting() -> int:
    # Briefly sets the process-wide umask, so only done once, at import (before any writer thread exists).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_from_proc()
if _UMASK_AT_IMPORT is None:
    _UMASK_AT_IMPORT = _umask_by_setting()


def current_umask() -> int:
    """The process umask, read without a race where the system allows it (else the one at import)."""
    mask = _umask_from_proc()
    return _UMASK_AT_IMPORT if mask is None else mask


def _mode_for(path: Path) -> int:
    """The mode of the regular file being replaced; a new file's otherwise (a symlink's
    target lends it nothing: the rename replaces the link, never writes through it)."""
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        return stat.S_IMODE(st.st_mode)
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temp file next to `path` for binary writing; rename it onto
    `path` when the block ends without an exception, delete it otherwise."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _mode_for(path))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise WriteError(
            e.errno, f"cannot write {path}: {e.strerror or e}; the previous version of the file (if any) is unchanged"
        ) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8; a file name that is not (kept by Python as surrogate escapes, e.g. a
    path in sweep.csv) is written as the bytes it is, not refused after the work."""
    write_bytes(path, text.encode("utf-8", "surrogateescape"))


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """matplotlib Figure.savefig, atomically (format from the suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_open(path) as f:
        fig.savefig(f, format=fmt, **kwargs)
