"""Checks of output paths before any work, so a long run is not lost to a typo.

check_writable: the target is not a folder, its folder exists (or can be made)
and a file can be created there; check_figure_format: matplotlib can write the
file's extension; check_outputs: both for every output of a command, and no
two the same file. All raise OutputError with one line naming the argument.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import paths


class OutputError(Exception):
    """An output path that cannot be written (the message names the argument and the path)."""


def check_writable(path: str | os.PathLike, arg: str, make_parents: bool = True) -> Path:
    """Refuse `path` unless a file can be written there (probed with a temp file, removed again)."""
    path = Path(path)
    if str(path) in ("", "."):
        raise OutputError(f"argument {arg}: empty path")
    try:
        what, parent_is = paths.kind(path), paths.kind(path.parent)
    except paths.PathError as e:
        raise OutputError(f"argument {arg}: {e}") from None
    if what == paths.FOLDER:
        raise OutputError(f"argument {arg}: {path} is a folder, expected a file name")
    parent = path.parent
    if parent_is != paths.FOLDER:
        if parent_is != paths.MISSING:
            raise OutputError(f"argument {arg}: {parent} (folder of {path}) is not a folder")
        if not make_parents:
            raise OutputError(f"argument {arg}: folder {parent} does not exist")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"argument {arg}: cannot create folder {parent} for {path}: {e.strerror or e}") from None
    try:  # os.access is not enough (root, read-only mounts): try it
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"argument {arg}: cannot write {path}: {e.strerror or e}") from None
    return path


def check_outputs(paths_by_arg: dict[str, str | os.PathLike | None], figures: tuple[str, ...] = ()) -> None:
    """Before a long run: every given output writable (check_writable), those in
    `figures` in a format matplotlib writes, and no two the same file (one would
    silently replace the other). Keys are the arguments' names (`--json`)."""
    seen: dict[Path, str] = {}
    for arg, path in paths_by_arg.items():
        if path is None:
            continue
        if arg in figures:
            check_figure_format(path, arg)
        check_writable(path, arg)
        key = Path(path).resolve()
        if key in seen:
            raise OutputError(f"argument {arg}: {path} is also the {seen[key]} file")
        seen[key] = arg


def check_figure_format(path: str | os.PathLike, arg: str) -> str:
    """The format matplotlib will write `path` in (its extension; png without one), refused
    with the list of supported ones when matplotlib cannot write it."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise OutputError(f"argument {arg}: writing {path} needs matplotlib (pip install matplotlib)") from None
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise OutputError(
            f"argument {arg}: cannot write {path}: unknown image format {fmt!r} "
            f"(extensions: {', '.join(sorted(supported))})"
        )
    return fmt
