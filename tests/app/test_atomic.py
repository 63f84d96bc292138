"""atomic.py: permissions like open(), a full disk keeps the previous file."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from fmnist_ext import atomic


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def umask():
    """os.umask, with the original restored after the test."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_new_files_get_0666_minus_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic.write_text(tmp_path / "a.json", "{}")
    with open(tmp_path / "plain", "w"):
        pass
    assert _mode(tmp_path / "a.json") == 0o666 & ~mask == _mode(tmp_path / "plain")
    assert atomic.current_umask() == mask


def test_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    p = tmp_path / "x.txt"
    p.write_text("old")
    os.chmod(p, 0o640)
    atomic.write_text(p, "new")
    assert p.read_text() == "new" and _mode(p) == 0o640


def test_umask_is_read_without_setting_it(umask, monkeypatch):
    """os.umask is process-wide: reading it by setting it would race with other threads' file creation."""
    umask(0o027)

    def forbidden(mask):
        raise AssertionError("os.umask called while writing")

    monkeypatch.setattr(atomic.os, "umask", forbidden)
    assert atomic.current_umask() == 0o027
    monkeypatch.undo()


def test_full_disk_keeps_the_previous_file_and_names_it(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    atomic.write_bytes(p, b"previous")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(atomic.WriteError) as e:
        atomic.write_bytes(p, b"new contents")
    assert e.value.errno == errno.ENOSPC
    assert str(e.value).startswith(f"cannot write {p}: No space left on device")
    assert p.read_bytes() == b"previous"
    assert [q.name for q in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
