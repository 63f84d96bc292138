"""Classify images with a trained checkpoint.

    python -m fmnist_ext.predict runs/baseline-fused-s0/checkpoint.pt shoe.png coat.jpg

Each image is read with Pillow, turned upright by its EXIF orientation,
converted to grayscale (16-bit images scaled from their 0-65535 range; 32-bit
float or integer images are refused, their range is unknown),
resized to 28x28 if needed, and (by default, when its border is brighter than its centre) inverted,
since Fashion-MNIST shows light garments on a black background. Prints the
top-3 classes with probabilities.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import checkpoint, cli, data
from .data.batches import normalize


class ImageError(Exception):
    """An image file that cannot be classified (the message names the file and why)."""


def load_image(path: str, invert: str = "auto") -> torch.Tensor:
    """uint8 (28, 28) tensor of an image file, upright (EXIF orientation applied)."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        # Pillow only warns between its pixel limit and twice it; an image that
        # big is refused either way (it would take GBs to decode).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                top = _integer_top(im)  # from the file's own pixel format, before any conversion
                im = ImageOps.exif_transpose(im)  # phone photos are stored sideways with a rotation tag
                t = _to_gray28(im, top)
    except ImageError as e:  # a mode this tool cannot convert without guessing
        raise ImageError(f"{path}: {e}") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{path}: too many pixels (over Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    except Exception as e:
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    if invert == "yes" or (invert == "auto" and _light_background(t)):
        t = 255 - t
    return t


# 16-bit integer modes: Pillow's convert("L") clips them at 255 (a 16-bit photo
# becomes black and white), so they are scaled from 0-65535 first.
_MODES_16 = ("I;16", "I;16L", "I;16B", "I;16N")


def _integer_top(im) -> int | None:
    """The top of the pixel range of a wide integer image as stored (65535 for 16
    bits), None for other modes. Mode "I" is 32 bits (a TIFF's int32) unless the
    file stores 16 (older Pillows open 16-bit PNGs as "I"): a 32-bit image has no
    known range (0-200 and 0-2**31 files both exist), so it is refused, as is
    a 32-bit float one."""
    if im.mode in _MODES_16:
        return 65535
    if im.mode == "I":
        args = im.tile[0][3] if im.tile else None  # (codec, extents, offset, args): the stored raw mode
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and rawmode.startswith("I;16"):
            return 65535
        raise ImageError("32-bit integer images are not supported (save it as 8- or 16-bit)")
    if im.mode == "F":  # no range to scale by: 0-1 and 0-255 files both exist, so guessing would be wrong
        raise ImageError("32-bit float images are not supported (save it as 8- or 16-bit)")
    return None


def _to_gray28(im, top: int | None) -> torch.Tensor:
    from PIL import Image

    if top is not None:
        import numpy as np

        a = np.asarray(im).astype(np.float64)
        if a.size and (a.min() < 0 or a.max() > top):
            raise ImageError(f"pixel values {a.min():g}..{a.max():g} outside the 16-bit range 0..{top}")
        im = Image.fromarray(np.rint(a * (255 / top)).astype(np.uint8), mode="L")
    else:
        im = im.convert("L")
    if im.size != (28, 28):
        im = im.resize((28, 28), Image.Resampling.LANCZOS)
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(28, 28)


def _light_background(t: torch.Tensor) -> bool:
    border = torch.cat([t[0], t[-1], t[:, 0], t[:, -1]]).float().mean()
    centre = t[7:21, 7:21].float().mean()
    return bool(border > centre)


@torch.no_grad()
def top_k(model, images_u8: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
    """Per image, the k most probable classes as (class name, probability), most probable first."""
    probs = torch.softmax(model(normalize(images_u8)), dim=1).cpu()
    top_probs, top_classes = probs.topk(k, dim=1)
    return [
        [(data.CLASSES[c], float(q)) for c, q in zip(classes.tolist(), ps.tolist())]
        for classes, ps in zip(top_classes, top_probs)
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=cli.prog("fmnist_ext.predict"),
        description="Top-3 Fashion-MNIST classes for grayscale (or colour, converted) PNG/JPEG images; "
        "images that are not 28x28 are resized.",
    )
    p.add_argument("checkpoint", help="checkpoint file written by fmnist_ext.train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument(
        "--invert",
        choices=("auto", "yes", "no"),
        default="auto",
        help="invert to light-on-dark like Fashion-MNIST: auto = when the border is brighter "
        "than the centre (default: auto)",
    )
    p.add_argument("--top", type=cli.positive_int, default=3, help="how many classes to show (default: 3, at most 10)")
    p.add_argument("--device", choices=cli.DEVICES, default="cpu", help="default: cpu")
    p.add_argument(
        "--kernels",
        choices=("fused", "stock"),
        default=None,
        help="conv blocks to run (default: the ones the checkpoint was trained with)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    return p


@cli.guarded("fmnist_ext.predict")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.refuse_bad_cpu_isa(parser)
    if args.top > 10:
        cli.fail(parser, f"argument --top: at most 10 classes, got {args.top}")
    device = cli.resolve_device(parser, args.device)
    try:
        model = checkpoint.load_model(args.checkpoint, args.kernels, device)
        batch = torch.stack([load_image(f, args.invert) for f in args.images]).to(device)
    except checkpoint.CheckpointError as e:
        cli.fail(parser, f"argument checkpoint: {e}")
    except ImageError as e:
        cli.fail(parser, f"argument IMAGE: {e}")
    infer = model.for_inference() if model.kernels == "fused" else model  # BatchNorm folded, one op
    for path, top in zip(args.images, top_k(infer, batch, args.top)):
        if args.json:
            print(json.dumps({"image": path, "top": [{"class": c, "probability": q} for c, q in top]}))
        else:
            print(f"{path}: " + ", ".join(f"{c} {q:.3f}" for c, q in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
