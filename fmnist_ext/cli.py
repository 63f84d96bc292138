"""Small helpers shared by the command-line tools: argument types, device choice, errors."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

import torch

DEVICES = ("auto", "cpu", "cuda")


def fail(parser: argparse.ArgumentParser, message: str, status: int = 2) -> NoReturn:
    """Print `prog: error: message` and exit with status 2 (argparse's convention for a user mistake)."""
    parser.exit(status, f"{parser.prog}: error: {message}\n")


def refuse_bad_cpu_isa(parser: argparse.ArgumentParser) -> None:
    """FMNIST_CPU_ISA naming a kernel build the CPU kernels refuse: one line,
    exit 2, before any work (the kernels would raise at their first call).
    Reads the op layer's private loader: the layer has no public name for
    this check (kernels_status() only raises it, as a ValueError)."""
    from .op import _library

    why = _library.cpu_isa_request_error()
    if why is not None:
        fail(parser, why)


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        fail(self, f"{message} (see --help)")


def _parsed(text: str, cast, acceptable, expected: str):
    """argparse type helper: cast(text), refused with one message unless acceptable."""
    try:
        v = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not acceptable(v):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _parsed(text, int, lambda v: v >= 1, "a positive integer")


def nonneg_int(text: str) -> int:
    return _parsed(text, int, lambda v: v >= 0, "a non-negative integer")


def batch_size(text: str) -> int:
    """A training batch size: at least 2, since BatchNorm cannot train on a batch of one image."""
    return _parsed(text, int, lambda v: v >= 2, "an integer >= 2 (BatchNorm cannot train on one image)")


def seed(text: str) -> int:
    """A seed torch.manual_seed accepts: [-2**63, 2**64)."""
    from .recipes import SEED_MAX, SEED_MIN

    return _parsed(text, int, lambda v: SEED_MIN <= v <= SEED_MAX, "an integer in [-2**63, 2**64)")


MAX_THREADS = 1024


def thread_count(text: str) -> int:
    """A torch thread count: [1, MAX_THREADS] (torch.set_num_threads takes a C int)."""
    return _parsed(text, int, lambda v: 1 <= v <= MAX_THREADS, f"an integer in [1, {MAX_THREADS}]")


def crop_pad(text: str) -> int:
    """The random-crop padding: at most recipes.MAX_CROP_PAD."""
    from .recipes import CROP_PAD_RANGE, MAX_CROP_PAD

    return _parsed(text, int, lambda v: 0 <= v <= MAX_CROP_PAD, CROP_PAD_RANGE)


def positive_float(text: str) -> float:
    return _parsed(text, float, lambda v: v > 0 and v != float("inf"), "a positive number")


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    return _parsed(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def nonneg_float(text: str) -> float:
    return _parsed(text, float, lambda v: v >= 0 and v != float("inf"), "a non-negative number")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="folder with the four Fashion-MNIST IDX files (gzipped or not; torchvision's "
        "ROOT/FashionMNIST/raw works too). Default: $FMNIST_DATA, the user cache, "
        "/usr/share/datasets/fashion-mnist, then a download into the user cache",
    )
    g.add_argument("--no-download", action="store_true", help="never download; fail if the files are not found")
    g.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the MD5 check against the official files (for other IDX data of the same format)",
    )


def resolve_device(parser: argparse.ArgumentParser, name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            fail(
                parser,
                "argument --device: cuda requested but no CUDA device is available "
                f"(torch {torch.__version__}); use --device cpu",
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def flag_pair(p, name: str, help_on: str, help_off: str) -> None:
    """--NAME / --no-NAME, default None (meaning: take it from the recipe)."""
    dest = name.replace("-", "_")
    p.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=help_on)
    p.add_argument(f"--no-{name}", dest=dest, action="store_false", help=help_off)


def print_err(*a) -> None:
    print(*a, file=sys.stderr)


def prog(module: str) -> str:
    """`python -m MODULE`, or the console script's name (fmnist-*) when run as one."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return argv0 if argv0.startswith("fmnist-") else f"python -m {module}"
