"""Checkpoints: one dict saved with torch.save, loadable with weights_only=True.

Every checkpoint holds format, model (the FashionCNN's state_dict) and
kernels; one written by training also holds the run's state, whose fields
are listed, written, read back and checked in one place: RunState in
train/state.py. `model_from` builds the EMA weights when present: those are
the run's result. This module knows nothing of training: `load(check=...)`
takes the training layer's extra checks (train/state.py's resume_problems).

Integrity: the file is torch.save's zip archive whose zip comment (the last
bytes of the file) holds the SHA-256 of every byte before it, so any change
to the file (one flipped bit anywhere) is refused on load, while
`torch.load(path, weights_only=True)` still reads it as it is. A file without
the hash is not one of ours (or lost its end): its zip CRCs are checked before
it is read, so the message can say which of the two it is.

`load` is the one reader (train --resume, evaluate, predict): every problem
with a file, its integrity or its structure raises CheckpointError with a
one-line message that starts with the file's path.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from . import atomic, paths
from .model import KERNELS, FashionCNN

FORMAT = "fmnist_ext.checkpoint/2"  # what save() writes: with the SHA-256 trailer

_TAG = b"fmnist_ext sha256 "
_TRAILER_LEN = len(_TAG) + 64
_EOCD_SIG = b"PK\x05\x06"  # zip end-of-central-directory record: 22 bytes, then the comment
_ZIP_SIG = b"PK\x03\x04"
# A FashionCNN checkpoint is about 1 MB; anything far larger is not one, and is not read into memory.
MAX_BYTES = 256 * 2**20


class CheckpointError(Exception):
    """A checkpoint that cannot be read, is damaged, or is not one of ours."""


# --------------------------------------------------------------------------- writing


def to_bytes(state: dict) -> bytes:
    """The checkpoint file's bytes: torch.save's zip with the SHA-256 trailer as its zip comment."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    raw = buf.getvalue()
    if raw[-22:-18] != _EOCD_SIG or raw[-2:] != b"\0\0":
        raise RuntimeError("torch.save wrote an unexpected zip layout; cannot add the checkpoint hash")
    # The comment length is set before hashing, so the hash covers it too.
    body = raw[:-2] + struct.pack("<H", _TRAILER_LEN)
    return body + _TAG + hashlib.sha256(body).hexdigest().encode()


def save(path: str | os.PathLike, state: dict) -> None:
    """Write atomically (the previous file stays until the new one is complete)."""
    atomic.write_bytes(path, to_bytes(state))


# --------------------------------------------------------------------------- reading


def load(path: str | os.PathLike, map_location="cpu", *, check: Callable[[dict], list[str]] | None = None) -> dict:
    """Read, verify and check a checkpoint; raise CheckpointError naming `path` otherwise.

    Always checked: integrity, format, the model weights (and EMA weights)
    against the FashionCNN's names, shapes and dtypes, kernels, settings.
    `check(ckpt)` adds the caller's problems (train --resume: the training state).
    """
    path = Path(path)
    raw = _read(path)
    try:
        ckpt = _verified_load(raw, map_location)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    problems = _problems(ckpt) + (check(ckpt) if check is not None else [])
    if problems:
        raise CheckpointError(
            f"{path}: not a usable fmnist_ext checkpoint: "
            + "; ".join(problems[:4])
            + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        )
    return ckpt


def _read(path: Path) -> bytes:
    try:
        what = paths.kind(path)
    except paths.PathError as e:
        raise CheckpointError(str(e)) from None
    if what == paths.FOLDER:
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise CheckpointError(
                f"{path}: not an fmnist_ext checkpoint ({size / 2**20:.0f} MiB; checkpoints are about 1 MiB)"
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None


def _verified_load(raw: bytes, map_location) -> dict:
    _check_zip_members(raw)
    hashed = _has_trailer(raw)
    if hashed:
        body, recorded = raw[:-_TRAILER_LEN], raw[-64:].decode("ascii")
        if hashlib.sha256(body).hexdigest() != recorded:
            raise CheckpointError(
                "damaged: its contents do not match the SHA-256 recorded when it was written "
                "(changed or corrupted since)"
            )
    elif not raw.startswith(_ZIP_SIG):
        raise CheckpointError("not an fmnist_ext checkpoint (not a PyTorch zip archive)")
    else:
        _check_zip_crcs(raw)
    try:
        ckpt = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message would suggest weights_only=False, i.e. running the file's code: never for a checkpoint
        raise CheckpointError(
            "not an fmnist_ext checkpoint (it holds Python objects a checkpoint never contains)"
        ) from None
    except Exception as e:  # a damaged archive fails in many ways inside torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"not a readable checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"not an fmnist_ext checkpoint (no format tag {FORMAT!r})")
    if not hashed:
        raise CheckpointError("damaged: its SHA-256 record (the end of the file) is missing or changed")
    return ckpt


def _check_zip_members(raw: bytes) -> None:
    """Before anything decompresses or allocates: the zip directory says every member
    is stored as it is (torch.save writes them so) and their sizes add up to no more
    than the file. A member compressed with DEFLATE would let a 1 MB file (with a
    valid hash) expand to any size inside torch.load or a CRC check."""
    if not raw.startswith(_ZIP_SIG):
        return  # not a zip at all: refused below, with its own message
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            members = z.infolist()
    except Exception as e:  # BadZipFile, and the odd struct error on a mangled archive
        raise CheckpointError(f"damaged or not a checkpoint (bad zip archive: {e})") from None
    packed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED or m.compress_size != m.file_size]
    if packed:
        raise CheckpointError(
            f"not an fmnist_ext checkpoint (compressed zip member {packed[0]}; torch.save stores them uncompressed)"
        )
    total = sum(m.file_size for m in members)
    if total > len(raw):
        raise CheckpointError(
            f"damaged or not a checkpoint (its zip members claim {total} bytes in a {len(raw)}-byte file)"
        )


def _has_trailer(raw: bytes) -> bool:
    tail = raw[-_TRAILER_LEN:]
    if len(raw) < _TRAILER_LEN + 22 or not tail.startswith(_TAG):
        return False
    digits = tail[len(_TAG) :]
    return all(c in b"0123456789abcdef" for c in digits)


def _check_zip_crcs(raw: bytes) -> None:
    """Checkpoints without the hash: at least every member's zip CRC (torch.load skips them)."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            bad = z.testzip()
    except Exception as e:  # BadZipFile, and the odd struct/zlib error on a mangled archive
        raise CheckpointError(f"damaged or not a checkpoint (bad zip archive: {e})") from None
    if bad is not None:
        raise CheckpointError(f"damaged: zip member {bad} fails its CRC check")


# --------------------------------------------------------------------------- structure


@functools.lru_cache(maxsize=1)
def _model_layout() -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in FashionCNN("stock").state_dict().items()}


def state_dict_problems(sd, what: str = "model") -> list[str]:
    """How `sd` differs from the FashionCNN's state_dict (names, shapes, dtypes)."""
    if not isinstance(sd, dict):
        return [f"{what} weights are a {type(sd).__name__}, not a state_dict"]
    layout = _model_layout()
    problems = []
    missing = [k for k in layout if k not in sd]
    extra = [k for k in sd if k not in layout]
    if missing or extra:
        problems.append(
            f"{what} weights are not the FashionCNN's (another architecture?): "
            + (f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {', '.join(map(str, extra[:3]))}{' ...' if len(extra) > 3 else ''}" if extra else "")
        )
    for k, (shape, dtype) in layout.items():
        v = sd.get(k)
        if k not in sd:
            continue
        if not isinstance(v, torch.Tensor):
            problems.append(f"{what} weight {k} is a {type(v).__name__}, not a tensor")
        elif tuple(v.shape) != shape:
            problems.append(f"{what} weight {k} has shape {list(v.shape)}, expected {list(shape)}")
        elif v.dtype.is_floating_point != dtype.is_floating_point:
            problems.append(f"{what} weight {k} has dtype {v.dtype}, expected {dtype}")
    return problems


def _problems(ck: dict) -> list[str]:
    problems = state_dict_problems(ck.get("model"), "model")
    ema = ck.get("ema")
    if ema is not None:
        if not isinstance(ema, dict) or not {"decay", "updates", "model"} <= set(ema):
            problems.append("ema is not a weight average (decay, updates, model)")
        else:
            problems += state_dict_problems(ema["model"], "EMA")
    if ck.get("kernels", "fused") not in KERNELS:
        problems.append(f"kernels {ck.get('kernels')!r} is not one of {', '.join(KERNELS)}")
    return problems


# --------------------------------------------------------------------------- using one


def model_from(ckpt: dict, kernels: str | None = None, device="cpu") -> FashionCNN:
    """The checkpoint's FashionCNN (its EMA weights when it has them), in eval mode, with `kernels` (default: the
    ones it was trained with; the state_dict keys are the same either way)."""
    model = FashionCNN(kernels or ckpt.get("kernels", "fused"))
    ema = ckpt.get("ema")
    model.load_state_dict(ema["model"] if ema else ckpt["model"])
    return model.to(device).eval()


def load_model(path: str | os.PathLike, kernels: str | None = None, device="cpu") -> FashionCNN:
    """evaluate/predict: the checkpoint at `path`, read and checked by `load`
    (a bad one raises CheckpointError naming it), as a FashionCNN on `device`."""
    return model_from(load(path, map_location="cpu"), kernels, device)
