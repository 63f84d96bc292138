"""The Fashion-MNIST data set: finding its folder, and loading its splits.

`load()` is what the commands call. Reading and checking a file is in
idx.py, downloading in download.py; this module decides where the files
come from. The four IDX files (gzipped or not) are looked for, in this order:

1. ``--data-dir`` (the ``data_dir`` argument),
2. the ``FMNIST_DATA`` environment variable (when set and not empty),
3. the user cache folder (``$XDG_CACHE_HOME/fmnist_ext`` or ``~/.cache/fmnist_ext``),
4. Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``),
5. a download from the official mirror into the cache folder.

1 and 2 are explicit choices: the first one given is the only place looked at
and must hold the files (an error names it otherwise; no fallback to another
copy). A folder in torchvision's layout works too: ``DIR/FashionMNIST/raw`` is
tried after ``DIR``. Only the files of the splits asked for are needed (the
test split: the two t10k files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import paths
from .download import MIRROR_ENV, OFFICIAL_MIRROR, download_all
from .idx import FILES, SPLITS, DataError, files_in, keys_for, read_idx

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

DATA_ENV = "FMNIST_DATA"
SYSTEM_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)


# --------------------------------------------------------------------------- finding


def cache_dir() -> Path:
    """The user cache folder the files are looked for in, and downloaded to."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fmnist_ext" / "fashion-mnist"


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


def _folder_state(d: Path, keys) -> str:
    what = paths.kind(d)
    if what == paths.MISSING:
        return "does not exist"
    if what != paths.FOLDER:
        return "not a folder"
    _, missing = files_in(d, keys)
    return f"missing {', '.join(FILES[k].name + '[.gz]' for k in missing)}"


def _explicit_error(label: str, d: Path, keys) -> DataError:
    """One line: the variable, the path and what is wrong with it."""
    name = f"{label}={d}" if label == DATA_ENV else f"{label} {d}"
    tv = d / "FashionMNIST" / "raw"
    where = _folder_state(d, keys)
    if paths.kind(d) == paths.FOLDER and paths.kind(tv) == paths.FOLDER and not files_in(d, keys)[0]:
        where = f"{_folder_state(tv, keys)} in its torchvision layout {tv}"
    if not where.startswith("missing"):
        where += f" (needs {', '.join(FILES[k].name + '[.gz]' for k in keys)})"
    return DataError(f"{name}: {where}")


@dataclass(frozen=True)
class Located:
    """The files found (key -> path), the folder holding them and where that folder came from."""

    paths: dict[str, Path]
    folder: Path
    source: str  # where the folder came from: --data-dir, FMNIST_DATA, user cache, ..., download


def locate(
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
        try:
            found, missing = files_in(d, keys)
            if not missing:
                return Located(found, d, label)
            tried.append(f"  {label}: {d} ({_folder_state(d, keys)})")
        except paths.PathError as e:  # a folder that may not be entered, a name too long
            if chosen is not None:
                raise DataError(f"{chosen[0]}: {e}") from None
            tried.append(f"  {label}: {e}")
    if chosen is not None:
        try:
            raise _explicit_error(*chosen, keys)
        except paths.PathError as e:
            raise DataError(f"{chosen[0]}: {e}") from None
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
    where = locate(data_dir, download=download, progress=progress, splits=splits)
    loaded = {s: load_split(where.paths, s, verify) for s in splits}
    return FashionMNIST(loaded.get("train"), loaded.get("test"), where.folder, where.source)
