"""Helpers for the application tests: synthetic IDX data sets, the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fmnist_ext import data


def synthetic(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable-ish synthetic images: class c brightens row band c."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for c in range(10):
        sel = labels == c
        images[sel, 2 + 2 * c : 4 + 2 * c, 4:24] = 220
    return images, labels


def write_dataset(folder: Path, n_train: int = 600, n_test: int = 200, gz: bool = True, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        ki, kl = data.SPLITS[split]
        images, labels = synthetic(n, seed + (split == "test"))
        data.write_idx(folder / (data.FILES[ki].name + suffix), images)
        data.write_idx(folder / (data.FILES[kl].name + suffix), labels)
    return folder


def real_data_dir() -> Path:
    """The real Fashion-MNIST folder; fails under CI when it is missing, skips otherwise."""
    for d in [os.environ.get(data.DATA_ENV), *map(str, data.SYSTEM_DIRS), str(data.cache_dir())]:
        if d and not data.files_in(Path(d))[1]:
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
