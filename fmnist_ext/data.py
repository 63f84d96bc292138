"""Fashion-MNIST files: finding them, downloading them, reading and checking them.

The four IDX files (gzipped or not) are looked for, in this order:

1. ``--data-dir`` (the ``data_dir`` argument; if given it must hold the files),
2. the ``FMNIST_DATA`` environment variable,
3. the user cache folder (``$XDG_CACHE_HOME/fmnist_ext`` or ``~/.cache/fmnist_ext``),
4. Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``),
5. a download from the official mirror into the cache folder.

A folder in torchvision's layout works too: for 1 and 2, ``DIR/FashionMNIST/raw``
is tried after ``DIR``. Verification is on the decompressed bytes (MD5 and
size), because repacked copies have other gz checksums but the same content.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import struct
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import atomic

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Training-set statistics of the pixel values scaled to [0, 1].
MEAN = 0.2860
STD = 0.3530
IMAGE_SIZE = 28

OFFICIAL_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MIRROR_ENV = "FMNIST_MIRROR"
DATA_ENV = "FMNIST_DATA"
SYSTEM_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)


@dataclass(frozen=True)
class IdxFile:
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
        IdxFile("train-images", "train-images-idx3-ubyte", "images",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a", 47_040_016, 60_000),
        IdxFile("train-labels", "train-labels-idx1-ubyte", "labels",
                "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9", 60_008, 60_000),
        IdxFile("t10k-images", "t10k-images-idx3-ubyte", "images",
                "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a", 7_840_016, 10_000),
        IdxFile("t10k-labels", "t10k-labels-idx1-ubyte", "labels",
                "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965", 10_008, 10_000),
    )
}
SPLITS = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}
IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


class DataError(Exception):
    """Missing, unreadable or bad Fashion-MNIST files (the message says which and why)."""


# --------------------------------------------------------------------------- reading

def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's content, decompressed when it is gzipped (detected by its magic)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return raw


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


def read_idx(path: str | os.PathLike, kind: str, verify: IdxFile | None = None) -> torch.Tensor:
    """Read an IDX file (gzipped or raw); with `verify`, check its decompressed
    size and MD5 against the official file first."""
    data = read_bytes(path)
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


# --------------------------------------------------------------------------- finding

def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fmnist_ext" / "fashion-mnist"


def files_in(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The files found in `directory` (raw preferred over .gz) and the keys missing."""
    found, missing = {}, []
    for key, f in FILES.items():
        for candidate in (directory / f.name, directory / (f.name + ".gz")):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(key)
    return found, missing


def candidates(data_dir: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """The folders looked at, in order, each with where it came from."""
    out: list[tuple[str, Path]] = []
    explicit = []
    if data_dir is not None:
        explicit.append(("--data-dir", Path(data_dir)))
    if os.environ.get(DATA_ENV):
        explicit.append((DATA_ENV, Path(os.environ[DATA_ENV])))
    for label, d in explicit:
        out.append((label, d))
        out.append((f"{label} (torchvision layout)", d / "FashionMNIST" / "raw"))
    out.append(("user cache", cache_dir()))
    out.extend(("Debian dataset-fashion-mnist", d) for d in SYSTEM_DIRS)
    return out


def locate(
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Paths of the four files, found or downloaded (see the module docstring).

    Raises DataError with the list of places tried when there are none.
    """
    tried = []
    for label, d in candidates(data_dir):
        found, missing = files_in(d)
        if not missing:
            return found
        state = "not a folder" if not d.is_dir() else ("no IDX files" if not found else f"missing {', '.join(missing)}")
        tried.append(f"  {label}: {d} ({state})")
        if data_dir is not None and len(tried) == 2:
            # An explicit --data-dir (or its torchvision layout) must hold the files.
            raise DataError(
                f"--data-dir {data_dir}: no complete set of Fashion-MNIST files there "
                f"(need {', '.join(f.name + '[.gz]' for f in FILES.values())}):\n" + "\n".join(tried)
            )
    if download:
        base = mirror or os.environ.get(MIRROR_ENV) or OFFICIAL_MIRROR
        try:
            return download_all(cache_dir(), base, progress=progress)
        except DataError as e:
            tried.append(f"  download from {base}: {e}")
    else:
        tried.append("  download: disabled (--no-download)")
    raise DataError(
        "Fashion-MNIST not found. Places tried, in order:\n" + "\n".join(tried) + "\n"
        "Get the files with one of:\n"
        "  sudo apt-get install dataset-fashion-mnist      (Debian/Ubuntu)\n"
        f"  download the four *-ubyte.gz files from {OFFICIAL_MIRROR} into a folder\n"
        f"  and pass it with --data-dir or {DATA_ENV}"
    )


# --------------------------------------------------------------------------- downloading

def download_file(url: str, dest: Path, md5: str | None = None, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download `url` to `dest` through a temp file in the same folder; check the
    byte count and (if given) the MD5 before renaming it into place."""
    h = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
            received = 0
            try:
                with atomic.atomic_open(dest) as f:
                    while True:
                        chunk = resp.read(1 << 16)
                        if not chunk:
                            break
                        f.write(chunk)
                        h.update(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                    if total is not None and received != total:
                        raise DataError(f"{url}: transfer broke off after {received} of {total} bytes")
                    if md5 is not None and h.hexdigest() != md5:
                        raise DataError(f"{url}: checksum mismatch: MD5 {h.hexdigest()}, expected {md5}")
            finally:
                if bar is not None:
                    bar.close()
    except DataError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"{url}: {getattr(e, 'reason', None) or e}") from None
    except http.client.HTTPException as e:  # IncompleteRead, RemoteDisconnected, ...
        raise DataError(f"{url}: transfer failed: {e!r}") from None
    return dest


def download_all(dest_dir: Path, base_url: str, md5s: dict[str, str] | None = None, progress: bool = True) -> dict[str, Path]:
    """Download the four gz files that `dest_dir` lacks from `base_url`."""
    md5s = md5s if md5s is not None else {k: f.gz_md5 for k, f in FILES.items()}
    base = base_url if base_url.endswith("/") else base_url + "/"
    found, _ = files_in(dest_dir)
    for key, f in FILES.items():
        if key not in found:
            found[key] = download_file(base + f.name + ".gz", dest_dir / (f.name + ".gz"), md5s.get(key), progress)
    return found


# --------------------------------------------------------------------------- loading

@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 28, 28)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class FashionMNIST:
    train: Split
    test: Split
    folder: Path


def load_split(paths: dict[str, Path], split: str, verify: bool = True) -> Split:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    ki, kl = SPLITS[split]
    images = read_idx(paths[ki], "images", FILES[ki] if verify else None)
    labels = read_idx(paths[kl], "labels", FILES[kl] if verify else None)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{paths[ki]} has {images.shape[0]} images but {paths[kl]} has {labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DataError(f"{paths[ki]}: no images")
    return Split(images, labels.long())


def load(
    data_dir: str | os.PathLike | None = None,
    verify: bool = True,
    download: bool = True,
    splits: tuple[str, ...] = ("train", "test"),
    progress: bool = True,
) -> FashionMNIST:
    """Find (or download) and read Fashion-MNIST into uint8 tensors."""
    paths = locate(data_dir, download=download, progress=progress)
    loaded = {s: load_split(paths, s, verify) for s in splits}
    return FashionMNIST(loaded.get("train"), loaded.get("test"), paths[SPLITS[splits[0]][0]].parent)


def write_idx(path: str | os.PathLike, tensor: torch.Tensor, compress: bool | None = None) -> None:
    """Write a uint8 tensor (N,28,28) or (N,) as an IDX file, atomically
    (gzipped when `compress`, by default when the name ends in .gz)."""
    t = tensor.to(torch.uint8).contiguous()
    if t.dim() == 3:
        header = struct.pack(">IIII", IMAGES_MAGIC, *t.shape)
    elif t.dim() == 1:
        header = struct.pack(">II", LABELS_MAGIC, t.shape[0])
    else:
        raise ValueError(f"expected a (N, H, W) or (N,) tensor, got shape {tuple(t.shape)}")
    data = header + t.numpy().tobytes()
    if compress is None:
        compress = str(path).endswith(".gz")
    atomic.write_bytes(path, gzip.compress(data, mtime=0) if compress else data)
