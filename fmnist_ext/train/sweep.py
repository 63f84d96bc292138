"""Sweeps: `--sweep lr=0.01,0.001 batch_size=100,1000` trains the cartesian
product, one run folder each (OUT/lr=0.01_batch_size=100, ...).

parse_sweep reads the grid, plan_sweep turns it into runs and checks them all
before any trains (no setting given twice, no two runs sharing a folder, every
folder name usable), run_sweep trains them and writes the table: markdown on
stdout, OUT/sweep.csv (only by a complete sweep).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import atomic, cli
from ..model import KERNELS
from . import recipes
from .config import RunConfig
from .divergence import EXIT_DIVERGED, Diverged, diverged_message
from .errors import UsageError
from .run import train_run


def _bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _choice(choices):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


SWEEP_TYPES = {
    "lr": cli.positive_float,
    "batch_size": cli.batch_size,
    "epochs": cli.positive_int,
    "seed": recipes.seed_arg,
    "kernels": _choice(KERNELS),
    "recipe": _choice(tuple(recipes.RECIPES)),
    "optimizer": _choice(recipes.OPTIMIZERS),
    "weight_decay": cli.nonneg_float,
    "schedule": _choice(recipes.SCHEDULES),
    "label_smoothing": cli.fraction,
    "crop_pad": recipes.crop_pad_arg,
    "flip": _bool,
    "shuffle": _bool,
    "ema": cli.fraction,
    "clean_epochs": cli.nonneg_int,
}


def parse_sweep(items: list[str]) -> list[tuple[str, list]]:
    """['lr=0.01,0.001', 'batch_size=100,1000'] -> [('lr', [0.01, 0.001]), ...]"""
    out, seen = [], set()
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values:
            raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,..., got {item!r}")
        if key not in SWEEP_TYPES:
            raise argparse.ArgumentTypeError(f"unknown key {key!r} (one of {', '.join(SWEEP_TYPES)})")
        if key in seen:
            raise argparse.ArgumentTypeError(f"key {key!r} given twice")
        seen.add(key)
        try:
            parsed = [SWEEP_TYPES[key](v.strip()) for v in values.split(",")]
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{key}: {e}") from None
        out.append((key, parsed))
    return out


@dataclass
class SweepRun:
    name: str
    values: tuple
    config: RunConfig
    out: Path


def plan_sweep(args, grid, base_out: Path) -> list[SweepRun]:
    """Every run of the sweep, checked before any of them trains: no setting
    given twice, no two runs sharing a folder, every folder name usable."""
    keys = [k for k, _ in grid]
    both = [k for k in keys if getattr(args, k, None) is not None]
    if both:
        raise UsageError(
            "--sweep",
            f"{', '.join(both)} also given as "
            f"{', '.join('--' + k.replace('_', '-') for k in both)}; give each setting once",
        )
    runs: list[SweepRun] = []
    for values in itertools.product(*(v for _, v in grid)):
        ns = argparse.Namespace(**vars(args))
        for k, v in zip(keys, values):
            setattr(ns, k, v)
        config = RunConfig.from_args(ns)
        name = "_".join(f"{k}={v}" for k, v in zip(keys, values)).replace("/", "-")
        if len(name.encode()) > 255:
            raise UsageError("--sweep", f"run folder name {name[:60]}... is longer than 255 bytes; sweep fewer keys")
        for other in runs:
            if other.config.trains_like(config) or other.name == name:
                what = f"run {name} comes twice" if other.name == name else f"runs {other.name} and {name} are the same"
                raise UsageError(
                    "--sweep",
                    f"{what}: the same setting (a value given twice, e.g. 0.01 and 0.010, or seeds -1 and "
                    "2**64-1, which torch treats as one); give each value once",
                )
        runs.append(SweepRun(name, values, config, base_out / name))
    return runs


def run_sweep(runs: list[SweepRun], keys: list[str], base_out: Path, d, device, ds, progress: bool) -> int:
    """Train every run, then print the table (best test accuracy first) and write sweep.csv.
    A run that diverges is reported and left (its folder keeps its last finite
    checkpoint); the others go on, the table lists it as diverged, and the exit
    status is then EXIT_DIVERGED."""
    results, diverged = [], []
    for r in runs:
        if d.main:
            print(f"== run {len(results) + 1}/{len(runs)}: {r.name}")
        row = dict(zip(keys, r.values))
        try:
            s = train_run(r.config, r.out, ds, device, d, progress=progress)
        except Diverged as e:
            if d.main:
                print(diverged_message(e, r.out), file=sys.stderr, flush=True)
            diverged.append(r.name)
            row.update(test_acc=None, train_acc=None, train_loss=None, epoch_time_s=None, status="diverged")
        else:
            row.update(
                test_acc=s["test_acc"],
                train_acc=s["final"]["train_acc"],
                train_loss=s["final"]["train_loss"],
                epoch_time_s=round(s["mean_epoch_time_s"], 2),
                status="done",
            )
        results.append({**row, "run": str(r.out)})
    results.sort(key=lambda r: -1.0 if r["test_acc"] is None else r["test_acc"], reverse=True)
    if d.main:
        cols = list(results[0])
        print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in results:
            print(
                "| "
                + " | ".join(
                    f"{r[c]:.4f}"
                    if isinstance(r[c], float) and c.endswith(("acc", "loss"))
                    else ("" if r[c] is None else str(r[c]))
                    for c in cols
                )
                + " |"
            )
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(results)
        atomic.write_text(base_out / "sweep.csv", buf.getvalue())
        print(f"\nwrote {base_out / 'sweep.csv'}")
        if diverged:
            print(f"{len(diverged)} run(s) diverged: {', '.join(diverged)}", file=sys.stderr, flush=True)
    return EXIT_DIVERGED if diverged else 0
