"""Classify images with a trained checkpoint.

    python -m fmnist_ext.predict runs/seed-fused-s0/checkpoint.pt shoe.png coat.jpg

Each image is read with Pillow, converted to grayscale, resized to 28x28 if
needed, and (by default, when its border is brighter than its centre) inverted,
since Fashion-MNIST shows light garments on a black background. Prints the
top-3 classes with probabilities.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import checkpoint, cli, data
from .batches import normalize


class ImageError(Exception):
    pass


def load_image(path: str, invert: str = "auto") -> torch.Tensor:
    """uint8 (28, 28) tensor of an image file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L")
            if im.size != (28, 28):
                im = im.resize((28, 28), Image.Resampling.LANCZOS)
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(28, 28)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    if invert == "yes" or (invert == "auto" and _light_background(t)):
        t = 255 - t
    return t


def _light_background(t: torch.Tensor) -> bool:
    border = torch.cat([t[0], t[-1], t[:, 0], t[:, -1]]).float().mean()
    centre = t[7:21, 7:21].float().mean()
    return bool(border > centre)


@torch.no_grad()
def top_k(model, images_u8: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
    probs = torch.softmax(model(normalize(images_u8)), dim=1).cpu()
    p, i = probs.topk(k, dim=1)
    return [[(data.CLASSES[c], float(v)) for c, v in zip(ci.tolist(), pi.tolist())] for ci, pi in zip(i, p)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog=cli.prog("fmnist_ext.predict"),
        description="Top-3 Fashion-MNIST classes for grayscale (or colour, converted) PNG/JPEG images; "
        "images that are not 28x28 are resized.",
    )
    p.add_argument("checkpoint", help="checkpoint file written by fmnist_ext.train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="invert to light-on-dark like Fashion-MNIST: auto = when the border is brighter "
                        "than the centre (default: auto)")
    p.add_argument("--top", type=cli.positive_int, default=3, help="how many classes to show (default: 3, at most 10)")
    p.add_argument("--device", choices=cli.DEVICES, default="cpu", help="default: cpu")
    p.add_argument("--kernels", choices=("fused", "stock"), default=None,
                   help="conv blocks to run (default: the ones the checkpoint was trained with)")
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    args = p.parse_args(argv)
    if args.top > 10:
        cli.fail(p, f"argument --top: at most 10 classes, got {args.top}")
    device = cli.resolve_device(p, args.device)
    try:
        model = checkpoint.model_from(checkpoint.load(args.checkpoint), args.kernels, device)
        batch = torch.stack([load_image(f, args.invert) for f in args.images]).to(device)
    except checkpoint.CheckpointError as e:
        cli.fail(p, f"argument checkpoint: {e}")
    except ImageError as e:
        cli.fail(p, f"argument IMAGE: {e}")
    for path, top in zip(args.images, top_k(model, batch, args.top)):
        if args.json:
            print(json.dumps({"image": path, "top": [{"class": c, "probability": q} for c, q in top]}))
        else:
            print(f"{path}: " + ", ".join(f"{c} {q:.3f}" for c, q in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
