"""Fashion-MNIST files: finding them, downloading them, reading and checking them.

The four IDX files (gzipped or not) are looked for, in this order:

1. ``--data-dir`` (the ``data_dir`` argument),
2. the ``FMNIST_DATA`` environment variable (when set and not empty),
3. the user cache folder (``$XDG_CACHE_HOME/fmnist_ext`` or ``~/.cache/fmnist_ext``),
4. Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``),
5. a download from the official mirror into the cache folder.

1 and 2 are explicit choices: the first one given is the only place looked at
and must hold the files (an error names it otherwise; no fallback to another
copy). A folder in torchvision's layout works too: ``DIR/FashionMNIST/raw`` is
tried after ``DIR``. Only the files of the splits asked for are needed (the
test split: the two t10k files). Verification is on the decompressed bytes (MD5 and
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
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
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


class DataError(Exception):
    """Missing, unreadable or bad Fashion-MNIST files (the message says which and why)."""


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


# --------------------------------------------------------------------------- finding


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fmnist_ext" / "fashion-mnist"


def files_in(directory: Path, keys=None) -> tuple[dict[str, Path], list[str]]:
    """The files found in `directory` (raw preferred over .gz) and the keys missing
    (of `keys`, default all four)."""
    found, missing = {}, []
    for key in keys or FILES:
        f = FILES[key]
        for candidate in (directory / f.name, directory / (f.name + ".gz")):
            if candidate.is_file():
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


def explicit_choice(data_dir: str | os.PathLike | None = None) -> tuple[str, Path] | None:
    """The folder the user chose (--data-dir, else a non-empty $FMNIST_DATA) and its label, or None."""
    if data_dir is not None:
        if str(data_dir) == "":
            raise DataError("--data-dir: empty path")
        return "--data-dir", Path(data_dir)
    if os.environ.get(DATA_ENV):
        return DATA_ENV, Path(os.environ[DATA_ENV])
    return None


def candidates(data_dir: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """The folders looked at, in order, each with where it came from. An
    explicit choice (--data-dir, else $FMNIST_DATA) is the only place looked
    at: if it fails, that is an error, not a reason to take another copy."""
    chosen = explicit_choice(data_dir)
    if chosen is not None:
        label, d = chosen
        return [(label, d), (f"{label} (torchvision layout)", d / "FashionMNIST" / "raw")]
    return [("user cache", cache_dir()), *(("Debian dataset-fashion-mnist", d) for d in SYSTEM_DIRS)]


def _state(d: Path, keys) -> str:
    if not d.exists():
        return "does not exist"
    if not d.is_dir():
        return "not a folder"
    _, missing = files_in(d, keys)
    return f"missing {', '.join(FILES[k].name + '[.gz]' for k in missing)}"


def _explicit_error(label: str, d: Path, keys) -> DataError:
    """One line: the variable, the path and what is wrong with it."""
    name = f"{label}={d}" if label == DATA_ENV else f"{label} {d}"
    tv = d / "FashionMNIST" / "raw"
    where = _state(d, keys)
    if d.is_dir() and tv.is_dir() and not files_in(d, keys)[0]:
        where = f"{_state(tv, keys)} in its torchvision layout {tv}"
    if not where.startswith("missing"):
        where += f" (needs {', '.join(FILES[k].name + '[.gz]' for k in keys)})"
    return DataError(f"{name}: {where}")


@dataclass(frozen=True)
class Located:
    paths: dict[str, Path]
    folder: Path
    source: str  # where the folder came from: --data-dir, FMNIST_DATA, user cache, ..., download


def locate_source(
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    mirror: str | None = None,
    progress: bool = True,
    splits: tuple[str, ...] = tuple(SPLITS),
) -> Located:
    """The files `splits` need, found or downloaded (see the module docstring), and where they came from.

    Raises DataError: one line naming the variable and the path when an explicit
    choice fails, else the list of places tried."""
    keys = keys_for(splits)
    chosen = explicit_choice(data_dir)
    tried = []
    for label, d in candidates(data_dir):
        found, missing = files_in(d, keys)
        if not missing:
            return Located(found, d, label)
        tried.append(f"  {label}: {d} ({_state(d, keys)})")
    if chosen is not None:
        raise _explicit_error(*chosen, keys)
    if download:
        base = mirror or os.environ.get(MIRROR_ENV) or OFFICIAL_MIRROR
        try:
            return Located(
                download_all(cache_dir(), base, progress=progress, keys=keys), cache_dir(), f"download from {base}"
            )
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


def locate(
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    mirror: str | None = None,
    progress: bool = True,
    splits: tuple[str, ...] = tuple(SPLITS),
) -> dict[str, Path]:
    """Paths of the files `splits` need (all four by default); see locate_source."""
    return locate_source(data_dir, download, mirror, progress, splits).paths


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


def download_all(
    dest_dir: Path, base_url: str, md5s: dict[str, str] | None = None, progress: bool = True, keys=None
) -> dict[str, Path]:
    """Download the gz files (of `keys`, default all four) that `dest_dir` lacks from `base_url`."""
    md5s = md5s if md5s is not None else {k: f.gz_md5 for k, f in FILES.items()}
    base = base_url if base_url.endswith("/") else base_url + "/"
    found, _ = files_in(dest_dir, keys)
    for key in keys or FILES:
        f = FILES[key]
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
    train: Split | None  # None when not loaded (see `splits`)
    test: Split | None
    folder: Path
    source: str = ""  # where `folder` came from: --data-dir, FMNIST_DATA, user cache, ...

    def describe(self) -> str:
        """One line for the log: which data folder was used and why (train and evaluate print it)."""
        return f"data: {self.folder}" + (f" (from {self.source})" if self.source else "")


def load_split(paths: dict[str, Path], split: str, verify: bool = True) -> Split:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    ki, kl = SPLITS[split]
    images = read_idx(paths[ki], "images", FILES[ki] if verify else None)
    labels = read_idx(paths[kl], "labels", FILES[kl] if verify else None)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths[ki]} has {images.shape[0]} images but {paths[kl]} has {labels.shape[0]} labels")
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
    """Find (or download) and read the `splits` of Fashion-MNIST into uint8 tensors;
    only their files need to exist. `.describe()` says which folder was used."""
    where = locate_source(data_dir, download=download, progress=progress, splits=splits)
    loaded = {s: load_split(where.paths, s, verify) for s in splits}
    return FashionMNIST(loaded.get("train"), loaded.get("test"), where.folder, where.source)


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
