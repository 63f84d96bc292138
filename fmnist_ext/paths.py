"""What is at a path, asked in one place: os.stat's answer or a one-line error.

Python's Path.exists/is_dir/is_file raise for every error other than "no such
file" (a folder the user may not enter, a name component over 255 bytes, a
symlink loop), which turned a mistyped or forbidden path into a traceback.
Every check of a path the user gave goes through kind(): "missing", "folder",
"file" or "other" (a device, a socket), or PathError naming the path and why
it cannot be checked. The callers add the argument's name.
"""

from __future__ import annotations

import errno
import os
import stat

MISSING, FOLDER, FILE, OTHER = "missing", "folder", "file", "other"


class PathError(Exception):
    """A path whose state cannot be known (the message starts with the path)."""


def reason(e: OSError) -> str:
    """An OSError as the few words a one-line message needs (no '[Errno N]')."""
    if e.errno == errno.ENAMETOOLONG:
        return "a name in it is too long (over 255 bytes) or the path is too long"
    return (e.strerror or str(e)).lower()


def kind(path: str | os.PathLike) -> str:
    """What `path` is (symlinks followed): MISSING, FOLDER, FILE or OTHER. Raises
    PathError when it cannot be known (permission denied on a folder above it,
    a name too long, a symlink loop, a NUL byte in it)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return MISSING
    except OSError as e:
        raise PathError(f"{os.fsdecode(path)}: cannot be checked: {reason(e)}") from None
    except ValueError:  # an embedded NUL byte
        raise PathError(f"{os.fsdecode(path)!r}: not a usable path (it contains a NUL byte)") from None
    if stat.S_ISDIR(st.st_mode):
        return FOLDER
    return FILE if stat.S_ISREG(st.st_mode) else OTHER


def open_regular(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """os.open of a file the app writes in place, never through a link: O_NOFOLLOW
    (a symlink of that name is refused, not followed to its target), and the file
    opened must be a regular file with a single link (not a hard link to another
    of the user's files, not a FIFO or device). Raises PathError naming it."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PathError(f"{os.fsdecode(path)}: is a symbolic link; refusing to write through it") from None
        raise PathError(f"{os.fsdecode(path)}: cannot open: {reason(e)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "has other hard links" if stat.S_ISREG(st.st_mode) else "is not a regular file"
        raise PathError(f"{os.fsdecode(path)}: {what}; refusing to write to it")
    return fd
