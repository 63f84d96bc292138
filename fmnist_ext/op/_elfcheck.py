"""Is a shared library file whole? Asked before dlopen, which maps the file
and may die of SIGBUS (not an exception) on one cut short by a failed copy or
a full disk.

An ELF file records where its parts are: the program headers (the segments
the loader maps) and the section header table, which the linker writes at
the end of the file. A file shorter than any of those extents is truncated.
Only the headers are read (a few KB).
"""

from __future__ import annotations

import os
import struct

_ELF_MAGIC = b"\x7fELF"
_PT_LOAD = 1


def truncation(path: str | os.PathLike) -> str | None:
    """Why `path` is not a whole 64-bit little-endian ELF file, or None when it is."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != _ELF_MAGIC:
                return f"not an ELF shared library ({size} bytes)"
            if head[4] != 2 or head[5] != 1:
                return "not a 64-bit little-endian ELF file"
            phoff, shoff = struct.unpack_from("<QQ", head, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 54)
            ends = [phoff + phentsize * phnum, shoff + shentsize * shnum]
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if len(table) == phentsize * phnum and phentsize >= 56:
        for i in range(phnum):
            p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if p_type == _PT_LOAD:
                ends.append(p_offset + p_filesz)
    need = max(ends)
    if need > size:
        return f"truncated: {size} bytes where its headers describe {need} (an interrupted copy or install?)"
    return None
