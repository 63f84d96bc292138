"""Training recipes: named sets of hyperparameters, and the objects they build.

``baseline``: the seed
project's recipe: Adam, lr 0.01, batch 1000, 20 epochs, cross-entropy, no
schedule, no augmentation (per-epoch shuffling on; --no-shuffle gives the
seed project's fixed order).

``improved``: the same architecture and 20 epochs, tuned on the real data:
a one-cycle schedule (peak 0.01, stepped per batch), label smoothing 0.1,
batches of 128, and random 28x28 crops of the 1-pixel zero-padded images,
switched off for the last 4 epochs so the low-rate end of the cycle fits,
and sets the BatchNorm statistics on, the plain images the test set has.
This small net underfits once regularised, so less regularisation won (no
flips, no weight decay). How it was chosen, run by run: docs/recipes.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import cli
from ..model import KERNELS

RECIPES: dict[str, dict] = {
    "baseline": dict(
        optimizer="adam",
        lr=0.01,
        batch_size=1000,
        epochs=20,
        weight_decay=0.0,
        schedule="none",
        label_smoothing=0.0,
        crop_pad=0,
        flip=False,
        shuffle=True,
        clean_epochs=0,
        ema=0.0,
    ),
    "improved": dict(
        optimizer="adam",
        lr=0.01,
        batch_size=128,
        epochs=20,
        weight_decay=0.0,
        schedule="onecycle",
        label_smoothing=0.1,
        crop_pad=1,
        flip=False,
        shuffle=True,
        clean_epochs=4,
        ema=0.0,
    ),
}
DEFAULT_RECIPE = "baseline"
TRAINING_KEYS = tuple(RECIPES[DEFAULT_RECIPE])
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "onecycle", "cosine")
# torch.manual_seed accepts exactly this range (negative seeds are mapped into it)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def torch_seed(seed: int) -> int:
    """The seed torch.manual_seed really uses: a negative one is taken modulo 2**64
    (-1 and 2**64-1 seed the same run)."""
    return seed % 2**64


# Random crops of the zero-padded 28x28 image: with a larger pad a crop can miss the image entirely
# (and the padded copy grows with the square of it: 100000 asked for 40 TB).
MAX_CROP_PAD = 27
CROP_PAD_RANGE = f"an integer in [0, {MAX_CROP_PAD}] (a larger pad can crop the 28x28 image away)"


def seed_arg(text: str) -> int:
    """argparse type: a seed torch.manual_seed accepts, [-2**63, 2**64)."""
    return cli.parsed(text, int, lambda v: SEED_MIN <= v <= SEED_MAX, "an integer in [-2**63, 2**64)")


def crop_pad_arg(text: str) -> int:
    """argparse type: the random-crop padding, at most MAX_CROP_PAD."""
    return cli.parsed(text, int, lambda v: 0 <= v <= MAX_CROP_PAD, CROP_PAD_RANGE)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# key -> (check, what it must be); a run's settings as saved in its checkpoint
_CHECKS = {
    "recipe": (lambda v: v in RECIPES, f"one of {', '.join(RECIPES)}"),
    "kernels": (lambda v: v in KERNELS, f"one of {', '.join(KERNELS)}"),
    "seed": (lambda v: _is_int(v) and SEED_MIN <= v <= SEED_MAX, "an integer in [-2**63, 2**64)"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    "lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "batch_size": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "epochs": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a non-negative number"),
    "label_smoothing": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "crop_pad": (lambda v: _is_int(v) and 0 <= v <= MAX_CROP_PAD, CROP_PAD_RANGE),
    "flip": (lambda v: isinstance(v, bool), "true or false"),
    "shuffle": (lambda v: isinstance(v, bool), "true or false"),
    "clean_epochs": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "ema": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
}


def config_problems(config) -> list[str]:
    """What is wrong with a run's saved settings (empty when nothing is)."""
    if not isinstance(config, dict):
        return [f"settings are a {type(config).__name__}, not a dict"]
    problems = []
    for key, (ok, what) in _CHECKS.items():
        if key not in config:
            problems.append(f"setting {key!r} missing")
        elif not ok(config[key]):
            problems.append(f"setting {key}={config[key]!r} is not {what}")
    return problems


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # fused=True: one kernel over all ~30k parameters instead of a loop of
    # small ops per tensor (Adam.step 0.32 ms vs 1.34 ms at batch 1000 on CPU).
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def make_scheduler(name: str, optimizer, lr: float, epochs: int, steps_per_epoch: int):
    """A scheduler stepped once per batch, or None."""
    total = max(1, epochs * steps_per_epoch)
    if name == "none":
        return None
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=0.25)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


def make_criterion(label_smoothing: float) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
