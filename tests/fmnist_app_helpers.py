"""Helpers for the application tests: synthetic IDX data sets, the real data, CLI exit codes."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import pytest
import torch

from fmnist_ext import data
from fmnist_ext.data import idx


def synthetic(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable-ish synthetic images: class c brightens row band c."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for c in range(10):
        sel = labels == c
        images[sel, 2 + 2 * c : 4 + 2 * c, 4:24] = 220
    return images, labels


def write_idx(path: str | os.PathLike, tensor: torch.Tensor, compress: bool | None = None) -> None:
    """Write a uint8 tensor (N, 28, 28) or (N,) as an IDX file (gzipped when
    `compress`, by default when the name ends in .gz). The app only reads IDX."""
    t = tensor.to(torch.uint8).contiguous()
    if t.dim() == 3:
        header = struct.pack(">IIII", idx.IMAGES_MAGIC, *t.shape)
    elif t.dim() == 1:
        header = struct.pack(">II", idx.LABELS_MAGIC, t.shape[0])
    else:
        raise ValueError(f"expected a (N, H, W) or (N,) tensor, got shape {tuple(t.shape)}")
    content = header + t.numpy().tobytes()
    if compress is None:
        compress = str(path).endswith(".gz")
    Path(path).write_bytes(gzip.compress(content, mtime=0) if compress else content)


def write_dataset(folder: Path, n_train: int = 600, n_test: int = 200, gz: bool = True, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        ki, kl = idx.SPLITS[split]
        images, labels = synthetic(n, seed + (split == "test"))
        write_idx(folder / (idx.FILES[ki].name + suffix), images)
        write_idx(folder / (idx.FILES[kl].name + suffix), labels)
    return folder


def real_data_dir() -> Path:
    """The real Fashion-MNIST folder; fails under CI when it is missing, skips otherwise."""
    for d in [os.environ.get(data.DATA_ENV), *map(str, data.SYSTEM_DIRS), str(data.cache_dir())]:
        if d and not idx.files_in(Path(d))[1]:
            return Path(d)
    msg = f"real Fashion-MNIST not found (install Debian's dataset-fashion-mnist or set {data.DATA_ENV})"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def exit_code(fn, argv) -> int:
    """A CLI main's return value, or its SystemExit code."""
    try:
        return fn(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch):
    """Import into a test module to run its CLIs as plain single processes."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
