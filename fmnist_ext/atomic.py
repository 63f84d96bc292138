"""Atomic file writes: a temp file in the same directory, then os.replace.

Nothing the user owns is ever half-written: a crash or Ctrl-C leaves either
the old file or the new one, plus at most a hidden ``.NAME.*.tmp`` that the
next write of the same name does not depend on.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temp file next to `path` for binary writing; rename it onto
    `path` when the block ends without an exception, delete it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def torch_save(obj, path: str | os.PathLike) -> None:
    import torch

    with atomic_open(path) as f:
        torch.save(obj, f)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """matplotlib Figure.savefig, atomically (format from the suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_open(path) as f:
        fig.savefig(f, format=fmt, **kwargs)
