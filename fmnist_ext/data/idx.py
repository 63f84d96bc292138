"""Fashion-MNIST's four IDX files: what the official ones are, and reading one safely.

IDX is the format they ship in: a big-endian header (magic number, count,
image size) followed by uint8 pixels or labels. Reading is capped: no file is
read past the size expected (the official size when verifying, else the size
its header announces) plus one byte, so a gzip bomb in place of a data file is
refused after a few MB. Verification is on the decompressed bytes (MD5 and
size), because repacked copies have other gz checksums but the same content.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import paths

IMAGE_SIZE = 28


class DataError(Exception):
    """Missing, unreadable or bad Fashion-MNIST files (the message says which and why)."""


# --------------------------------------------------------------------------- the official files


@dataclass(frozen=True)
class IdxFile:
    """One of the four official files, as the lookup, the download and the verification need it."""

    key: str
    name: str  # basename without .gz
    kind: str  # "images" or "labels"
    gz_md5: str
    md5: str  # of the decompressed bytes
    size: int  # decompressed bytes
    count: int


FILES = {
    f.key: f
    for f in (
        IdxFile(
            "train-images",
            "train-images-idx3-ubyte",
            "images",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            47_040_016,
            60_000,
        ),
        IdxFile(
            "train-labels",
            "train-labels-idx1-ubyte",
            "labels",
            "25c81989df183df01b3e8a0aad5dffbe",
            "9018921c3c673c538a1fc5bad174d6f9",
            60_008,
            60_000,
        ),
        IdxFile(
            "t10k-images",
            "t10k-images-idx3-ubyte",
            "images",
            "bef4ecab320f06d8554ea6380940ec79",
            "8181f5470baa50b63fa0f6fddb340f0a",
            7_840_016,
            10_000,
        ),
        IdxFile(
            "t10k-labels",
            "t10k-labels-idx1-ubyte",
            "labels",
            "bb300cfdad3c16e7a12a480ee83cd310",
            "15d484375f8d13e6eb1aabb0c3f46965",
            10_008,
            10_000,
        ),
    )
}
SPLITS = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}
IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def files_in(directory: Path, keys=None) -> tuple[dict[str, Path], list[str]]:
    """The files found in `directory` (raw preferred over .gz) and the keys missing
    (of `keys`, default all four). Raises paths.PathError when a file's state
    cannot be known (a folder that may not be entered, a name too long)."""
    found, missing = {}, []
    for key in keys or FILES:
        f = FILES[key]
        for candidate in (directory / f.name, directory / (f.name + ".gz")):
            if paths.kind(candidate) == paths.FILE:
                found[key] = candidate
                break
        else:
            missing.append(key)
    return found, missing


def keys_for(splits=tuple(SPLITS)) -> tuple[str, ...]:
    """The file keys the `splits` need (evaluate needs only the test files)."""
    if not splits:
        raise ValueError("splits must name at least one of " + ", ".join(SPLITS))
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {s!r}")
    return tuple(k for s in splits for k in SPLITS[s])


# --------------------------------------------------------------------------- reading


def read_bytes(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The file's content, decompressed when it is gzipped (detected by its magic).

    With `limit`, at most limit + 1 bytes are read (decompressed), so that a
    file bigger than it can be refused without holding all of it in memory (a
    few MB of gzip can expand to many GB)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            if gz:
                with gzip.GzipFile(fileobj=f) as g:
                    return _read_upto(g, limit)
            return _read_upto(f, limit)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _read_upto(f, limit: int | None, chunk: int = 1 << 20) -> bytes:
    """Everything in `f`, or its first limit + 1 bytes (in chunks, so memory follows what is read)."""
    if limit is None:
        return f.read()
    buf = bytearray()
    while len(buf) <= limit:
        part = f.read(min(chunk, limit + 1 - len(buf)))
        if not part:
            break
        buf += part
    return bytes(buf)


def parse_idx(data: bytes, kind: str, source: str = "<bytes>") -> torch.Tensor:
    """Parse an IDX images (N, 28, 28) or labels (N,) file into a uint8 tensor."""
    if kind not in ("images", "labels"):
        raise ValueError(f"kind must be 'images' or 'labels', got {kind!r}")
    magic_expected, header = (IMAGES_MAGIC, 16) if kind == "images" else (LABELS_MAGIC, 8)
    if len(data) < 4:
        raise DataError(f"{source}: too short for an IDX file ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != magic_expected:
        raise DataError(
            f"{source}: wrong magic number 0x{magic:08x} for an IDX {kind} file (expected 0x{magic_expected:08x})"
        )
    if len(data) < header:
        raise DataError(f"{source}: truncated header ({len(data)} bytes, expected at least {header})")
    if kind == "images":
        n, rows, cols = struct.unpack(">III", data[4:16])
        if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{source}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        shape = (n, rows, cols)
    else:
        (n,) = struct.unpack(">I", data[4:8])
        shape = (n,)
    expected = header + n * (IMAGE_SIZE * IMAGE_SIZE if kind == "images" else 1)
    if len(data) < expected:
        raise DataError(f"{source}: truncated: {len(data)} bytes, the header announces {n} {kind} ({expected} bytes)")
    if len(data) > expected:
        raise DataError(f"{source}: {len(data) - expected} unexpected bytes after the {n} {kind} the header announces")
    t = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)
    if kind == "labels" and n and int(t.max()) > 9:
        bad = int(torch.nonzero(t > 9)[0, 0])
        raise DataError(f"{source}: label {int(t[bad])} at index {bad} is out of range 0-9")
    return t


def expected_size(header: bytes, kind: str) -> int | None:
    """Bytes an IDX file of `kind` has according to its header (None if the
    header is too short or not of that kind: parse_idx then says why)."""
    if kind == "images" and len(header) >= 16 and struct.unpack(">I", header[:4])[0] == IMAGES_MAGIC:
        n, rows, cols = struct.unpack(">III", header[4:16])
        return 16 + n * rows * cols
    if kind == "labels" and len(header) >= 8 and struct.unpack(">I", header[:4])[0] == LABELS_MAGIC:
        return 8 + struct.unpack(">I", header[4:8])[0]
    return None


def read_idx(path: str | os.PathLike, kind: str, verify: IdxFile | None = None) -> torch.Tensor:
    """Read an IDX file (gzipped or raw); with `verify`, check its decompressed
    size and MD5 against the official file first.

    Never reads more than the size that is expected (the official size with
    `verify`, else the size the header announces) plus one byte."""
    if kind not in ("images", "labels"):
        raise ValueError(f"kind must be 'images' or 'labels', got {kind!r}")
    head = read_bytes(path, limit=16)
    expected = verify.size if verify is not None else expected_size(head, kind)
    data = head if expected is None else read_bytes(path, limit=expected)
    if expected is not None and len(data) > expected:
        what = (
            f"the official {verify.name} has {verify.size}"
            if verify is not None
            else f"the header announces {expected}"
        )
        raise DataError(
            f"{path}: unexpected bytes: more than {expected} bytes decompressed, {what} "
            "(stopped reading there: corrupt, or not Fashion-MNIST?)"
        )
    if verify is not None:
        if len(data) != verify.size:
            raise DataError(
                f"{path}: {len(data)} bytes decompressed, the official {verify.name} has {verify.size} "
                "(truncated or not Fashion-MNIST?)"
            )
        digest = hashlib.md5(data).hexdigest()
        if digest != verify.md5:
            raise DataError(f"{path}: checksum mismatch: MD5 {digest}, expected {verify.md5} for {verify.name}")
    return parse_idx(data, kind, str(path))
