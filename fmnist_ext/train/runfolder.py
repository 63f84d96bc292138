"""Run folders: checked before anything is created, locked while a run owns them.

    check_path(out)                         # before anything is loaded or created
    with RunFolder(out):                    # creates it (and its parents) if needed, then locks it
        ...train...

The lock is fcntl.flock on a hidden lock file inside the folder, held for the
run's life and released by the OS when the process ends, however it ends. It
is opened without following links (paths.open_regular): a symlink or hard
link of its name is refused, never written through. The
lock file holds the owner (pid, host, start time) so that a second run on the
same folder can say who has it. On exit the lock file is removed, and so is
every folder this RunFolder created if nothing else was put in it (a run
refused before it wrote anything leaves no empty folder behind).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import resource
import socket
from pathlib import Path

from .. import paths

LOCK_NAME = ".fmnist_ext.lock"
# What a training run writes into its folder (the tensorboard folder too).
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "confusion.png", "curves.png", "summary.json", "tensorboard")


class RunFolderError(Exception):
    """The folder cannot be used: not a folder, cannot be created, or in use by another run."""


def check_path(path: Path) -> None:
    """Whether `path` can be (or is) a run folder, without creating anything."""
    what = _kind(path)
    if what not in (paths.MISSING, paths.FOLDER):
        raise RunFolderError(f"{path} exists and is not a folder")
    ancestor = path
    while what == paths.MISSING and ancestor.parent != ancestor:
        ancestor = ancestor.parent
        what = _kind(ancestor)
    if what != paths.FOLDER:
        raise RunFolderError(f"{ancestor} is a file, so {path} cannot be created under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunFolderError(
            f"{ancestor} is not writable (permission denied), so {path} cannot be "
            f"{'used' if ancestor == path else 'created'}"
        )


def _kind(path: Path) -> str:
    try:
        return paths.kind(path)
    except paths.PathError as e:
        raise RunFolderError(str(e)) from None


# Descriptors kept free beside the locks: torch, the data files, matplotlib, checkpoint writes.
SPARE_DESCRIPTORS = 256


def make_room_for_locks(n: int) -> None:
    """Let this process hold `n` more lock files open (a sweep holds one per run
    folder): raise the soft descriptor limit (the default soft limit, 1024, is
    below a sweep of ~1000 runs) up to the hard one, or refuse in one line before
    anything is created when even the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = SPARE_DESCRIPTORS
    need = in_use + n + SPARE_DESCRIPTORS
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise RunFolderError(
            f"{n} locked folders (the sweep's and one per run) need {n} open files, and this process "
            f"may open at most {hard} (ulimit -Hn); sweep fewer runs at a time"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class RunFolder:
    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        self.create = create
        self._created: list[Path] = []
        self._fd: int | None = None

    def __enter__(self) -> RunFolder:
        check_path(self.path)
        try:
            if self.create:
                self._make_dirs()
            elif _kind(self.path) != paths.FOLDER:
                raise RunFolderError(f"{self.path}: no such folder")
            self._lock()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup()

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    def _make_dirs(self) -> None:
        missing = []
        p = self.path
        while _kind(p) == paths.MISSING:
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:  # made by someone else meanwhile: theirs, not ours to remove
                continue
            except OSError as e:
                raise RunFolderError(f"cannot create {p} ({e.strerror or e})") from None
            self._created.append(p)

    def _lock(self) -> None:
        for _ in range(10):  # retried only when the lock file was replaced under us
            try:  # never through a symlink or hard link: the holder line would overwrite its target
                fd = paths.open_regular(self.lock_path, os.O_RDWR | os.O_CREAT)
            except paths.PathError as e:
                raise RunFolderError(
                    f"cannot use the lock file {e}; remove it if no run is using {self.path}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderError(
                    f"{self.path} is in use by another run ({holder}); wait for it to end or choose another --out"
                ) from None
            # The previous owner removes the file on exit: if it did so between our open and our lock,
            # we hold the lock of a file no one else will see; take the new one instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                self._write_holder()
                return
            os.close(fd)
        raise RunFolderError(f"cannot lock {self.path}: its lock file keeps changing")

    def _write_holder(self) -> None:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        text = f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n"
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text.encode(), 0)
        except OSError as e:
            raise RunFolderError(f"cannot write the lock file {self.lock_path} ({e.strerror or e})") from None

    def _cleanup(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)  # while still locked: see _lock
            os.close(self._fd)
            self._fd = None
        for p in reversed(self._created):  # deepest first; rmdir refuses anything not empty
            with contextlib.suppress(OSError):
                p.rmdir()
        self._created = []


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 300, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "owner unknown"
