"""Checkpoints: one dict saved with torch.save, loadable with weights_only=True.

Contents: format, model (state_dict), optimizer, scheduler (or None), epoch
(epochs completed), step (batches done in the epoch in progress, 0 at an
epoch boundary), rng (CPU/CUDA RNG states and the data generator's state at
the start of the epoch in progress, all uint8 tensors), partial (running sums
of the epoch in progress), history (per-epoch metrics), config (the run's
settings, plain values), kernels, ema (None, or the weight EMA: decay,
updates, model = its state_dict; absent in checkpoints written before --ema).
`model_from` builds the EMA weights when present: those are the run's result.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from . import atomic
from .model import FashionCNN

FORMAT = "fmnist_ext.checkpoint/1"


class CheckpointError(Exception):
    """A checkpoint that cannot be read or is not one of ours."""


def save(path: str | os.PathLike, state: dict) -> None:
    atomic.torch_save({"format": FORMAT, **state}, path)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an fmnist_ext checkpoint (format {FORMAT!r} expected)")
    return ckpt


def model_from(ckpt: dict, kernels: str | None = None, device="cpu") -> FashionCNN:
    """The checkpoint's FashionCNN (its EMA weights when it has them), in eval mode, with `kernels` (default: the
    ones it was trained with; the state_dict keys are the same either way)."""
    model = FashionCNN(kernels or ckpt.get("kernels", "fused"))
    ema = ckpt.get("ema")
    model.load_state_dict(ema["model"] if ema else ckpt["model"])
    return model.to(device).eval()


def rng_state(data_generator: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": data_generator.get_state(),
    }


def set_rng_state(state: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    data_generator.set_state(state["data"])
