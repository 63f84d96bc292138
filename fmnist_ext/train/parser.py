"""The training command's arguments: build_parser, and nothing else.

Options of the recipe default to None, meaning "take it from the --recipe"
(RunConfig.from_args), so that --resume can tell which ones were given.
"""

from __future__ import annotations

import argparse

from .. import cli
from ..model import KERNELS
from . import recipes
from .sweep import SWEEP_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineErrorParser(
        prog=cli.prog("fmnist_ext.train"),
        description="Train the FashionCNN (the seed project's network) on Fashion-MNIST (fused or stock conv blocks). "
        "Options left unset come from the --recipe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipes:\n"
        + "\n".join(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in r.items()) for name, r in recipes.RECIPES.items())
        + "\n\nUnder torchrun (RANK and WORLD_SIZE set) the loop runs with DistributedDataParallel "
        "(gloo on CPU, nccl on CUDA); only rank 0 writes files. A --resume needs the number of processes "
        "the checkpoint was written with.\n\nBatches: when the last batch of an epoch (of each process) would "
        "hold a single image, that image joins the previous batch (BatchNorm cannot train on one image; no "
        "image is dropped).\n\nThe run folder is locked while a run uses it: a second run on it is refused. "
        "Exit status: 0 done, 2 a usage error (one line), 1 training diverged (a NaN/inf loss: the last "
        "finite checkpoint is kept) or a file could not be written (the previous "
        "version is kept), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM; progress saved as for Ctrl-C).",
    )
    p.add_argument(
        "--recipe",
        choices=tuple(recipes.RECIPES),
        default=None,
        help=f"hyperparameter set (default: {recipes.DEFAULT_RECIPE})",
    )
    p.add_argument(
        "--kernels",
        choices=KERNELS,
        default=None,
        help="conv blocks: the fused operator or stock PyTorch layers (default: fused)",
    )
    p.add_argument(
        "--seed",
        type=recipes.seed_arg,
        default=None,
        help="seed for weights, shuffling and augmentation, in [-2**63, 2**64) (default: 0)",
    )
    p.add_argument("--device", choices=cli.DEVICES, default="auto", help="auto: CUDA when present (default: auto)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="run folder (default: runs/RECIPE-KERNELS-sSEED; with --sweep, one subfolder per run)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt with the settings saved there"
    )
    g = p.add_argument_group("recipe overrides")
    g.add_argument("--epochs", type=cli.positive_int, default=None, help="number of epochs (baseline: 20)")
    g.add_argument(
        "--lr", type=cli.positive_float, default=None, help="learning rate; peak rate with onecycle (baseline: 0.01)"
    )
    g.add_argument(
        "--batch-size",
        type=cli.batch_size,
        default=None,
        help="batch size, at least 2; a last batch of one image joins the one before (baseline: 1000)",
    )
    g.add_argument("--optimizer", choices=recipes.OPTIMIZERS, default=None, help="optimizer (baseline: adam)")
    g.add_argument("--weight-decay", type=cli.nonneg_float, default=None, help="weight decay (baseline: 0)")
    g.add_argument(
        "--schedule",
        choices=recipes.SCHEDULES,
        default=None,
        help="learning-rate schedule, stepped per batch (baseline: none)",
    )
    g.add_argument("--label-smoothing", type=cli.fraction, default=None, help="label smoothing in [0, 1) (baseline: 0)")
    g.add_argument(
        "--crop-pad",
        type=recipes.crop_pad_arg,
        default=None,
        help=f"random-crop augmentation with this zero padding, 0 = off, at most {recipes.MAX_CROP_PAD} (baseline: 0)",
    )
    cli.flag_pair(g, "flip", "random horizontal flips", "no flips (baseline)")
    cli.flag_pair(
        g,
        "shuffle",
        "shuffle each epoch from the seeded generator (baseline recipe: on)",
        "keep the file order every epoch",
    )
    g.add_argument(
        "--clean-epochs",
        type=cli.nonneg_int,
        default=None,
        metavar="N",
        help="train the last N epochs on the plain images: no crops, no flips (baseline: 0)",
    )
    g.add_argument(
        "--ema",
        type=cli.fraction,
        default=None,
        metavar="DECAY",
        help="evaluate and save an exponential moving average of the weights and BatchNorm "
        "statistics, updated every batch with this decay (warm-up min(DECAY, (1+t)/(10+t))); "
        "0 = off, evaluate the raw weights (baseline: 0)",
    )
    p.add_argument(
        "--sweep",
        nargs="+",
        default=None,
        metavar="KEY=V1,V2",
        help="train the cartesian product of these settings (keys: "
        + ", ".join(SWEEP_TYPES)
        + "); prints a markdown table sorted by test accuracy and writes OUT/sweep.csv",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="capture the training step (forward, loss, backward, optimizer step) in a CUDA graph "
        "and replay it for every full-size batch: one launch per step instead of ~100 from Python. "
        "CUDA only, one process, no --schedule, no --sweep; refused otherwise. Off by default: "
        "it has not yet run on a GPU",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms(True) (warn only) and no cuDNN benchmarking",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log to OUT/tensorboard (needs the optional tensorboard package)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    cli.add_data_args(p)
    return p
