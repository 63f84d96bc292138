"""A checkpoint's model for the evaluate and predict commands, or one CheckpointError.

`checkpoint.load` refuses files that are not checkpoints; a file that is one
but of another shape (missing or mismatched weights) only fails when the model
is built from it, with a multi-line KeyError/RuntimeError: that becomes the
same one-line CheckpointError naming the file. LOAD is the one place the
loader is named, so switching to another loader is a one-line change.
"""
from __future__ import annotations

import os

from . import checkpoint

LOAD = checkpoint.load  # signature load(path, map_location=...), raises checkpoint.CheckpointError
Error = checkpoint.CheckpointError


def load_model(path: str | os.PathLike, kernels: str | None, device):
    """The checkpoint's FashionCNN on `device`, in eval mode."""
    ckpt = LOAD(path, map_location="cpu")
    try:
        return checkpoint.model_from(ckpt, kernels, device)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:240] or type(e).__name__
        raise Error(f"{path}: not a checkpoint of this model ({type(e).__name__}: {detail})") from None
