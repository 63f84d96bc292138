"""`python -m fmnist_ext.train` / `fmnist-train`: the thin layer between the
command line and a run (run.py) or a sweep (sweep.py).

Everything that can be checked is checked before the data load or a folder
is made: the arguments, the run folders (runfolder.check_path), nothing of
the user's overwritten, the checkpoint to resume against the command line and
the process count. A mistake is a UsageError: one `prog: error:` line, exit
2. A file that cannot be written: one line, exit 1 (the previous version is
kept). Ctrl-C: exit 130 (after saving a checkpoint when training had started).
The run folders stay locked until main returns (runfolder.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

import torch

from .. import atomic, checkpoint, cli, data, paths
from . import recipes
from .config import SETTINGS, RunConfig
from .distributed import Dist, barrier, dist_from_env, init_distributed, shutdown
from .divergence import EXIT_DIVERGED, Diverged, diverged_message
from .errors import UsageError
from .interrupt import Interrupted, resume_command
from .parser import build_parser
from .run import train_run
from .runfolder import RUN_FILES, RunFolder, RunFolderError, check_path, make_room_for_locks
from .state import resume_problems
from .step import graph_refusal
from .sweep import SweepRun, parse_sweep, plan_sweep, run_sweep


@cli.guarded("fmnist_ext.train")  # `train ... | head`: a closed stdout pipe exits 141 quietly
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with contextlib.ExitStack() as folders:
            return _main(parser, args, folders)
    except UsageError as e:
        cli.fail(parser, str(e))
    except atomic.WriteError as e:  # a full disk, a folder made read-only during the run
        cli.fail(parser, str(e), status=1)
    except KeyboardInterrupt as e:  # before training started (checks, data loading): nothing was written
        what = "terminated" if isinstance(e, cli.Terminated) else "interrupted"
        print(f"\n{what} before training started; nothing was trained or saved", file=sys.stderr, flush=True)
        return cli.exit_status(e)


def _main(parser, args, folders: contextlib.ExitStack) -> int:
    """main's work; raises UsageError for anything the user can fix. `folders`
    holds the run folder locks until the process is done."""
    grid = _check_args(args)
    config = RunConfig.from_args(args)
    _check_cuda_graphs(args, config, args.device, dist_from_env().world_size)
    sweep = grid is not None
    if sweep:
        out = Path(args.out or f"runs/sweep-{config.recipe}")
    else:
        out = Path(args.out or f"runs/{config.recipe}-{config.kernels}-s{config.seed}")
    runs = plan_sweep(args, grid, out) if sweep else []
    d0 = _check_folders(args, out, runs)
    if d0.main:  # only rank 0 writes, so only it owns the folders
        _lock_folders(folders, args, out, runs)
    resume = None
    if args.resume:
        resume, config = _load_resume(args, out, d0.world_size)
        _check_cuda_graphs(args, config, args.device, d0.world_size)  # the checkpoint's settings
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    d, device = init_distributed(parser, args.device)
    from ..selfcheck import precheck_training  # fused kernels usable here? else exit 2

    precheck_training(parser, config.kernels, device, config.batch_size)
    ds = _load_data(parser, args, d)
    _check_data(ds, d, resume, out)
    if d.main:
        print(
            f"{ds.describe()} ({len(ds.train)} train, {len(ds.test)} test); device {device}"
            + (f" x {d.world_size} processes" if d.enabled else "")
            + f"; kernels {config.kernels}",
            flush=True,
        )
    try:
        if sweep:
            return run_sweep(runs, [k for k, _ in grid], out, d, device, ds, progress=not args.no_progress)
        train_run(
            config,
            out,
            ds,
            device,
            d,
            resume,
            progress=not args.no_progress,
            tensorboard=args.tensorboard,
            cuda_graphs=args.cuda_graphs,
        )
        return 0
    except checkpoint.CheckpointError as e:
        raise UsageError("--resume", str(e)) from None
    except Diverged as e:
        if d.main:
            print(f"\n{diverged_message(e, out)}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except Interrupted as e:
        if d.main:
            cmd = resume_command(e.out, d)
            print(
                f"\nstopped {e}; checkpoint saved to {e.out / 'checkpoint.pt'}.\n"
                + (
                    f"The sweep stops here and {out / 'sweep.csv'} is not written; finish this run with: {cmd}"
                    if sweep
                    else f"resume with: {cmd}"
                ),
                file=sys.stderr,
                flush=True,
            )
        return e.status
    except KeyboardInterrupt as e:
        if d.main:
            print(
                f"\naborted; the last checkpoint in {out} (if any) is intact"
                + ("" if sweep else "; resume with --resume"),
                file=sys.stderr,
                flush=True,
            )
        return cli.exit_status(e)
    finally:
        shutdown(d)


# --------------------------------------------------------------------------- checks before any work


def _check_args(args) -> list | None:
    """Everything about the command line alone; returns the sweep grid (or None)."""
    grid = None
    if args.sweep is not None:
        try:
            grid = parse_sweep(args.sweep)
        except argparse.ArgumentTypeError as e:
            raise UsageError("--sweep", str(e)) from None
        if args.resume:
            raise UsageError("--resume", "not allowed with --sweep")
        if args.tensorboard:
            raise UsageError("--tensorboard", "not supported with --sweep")
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError as e:
            raise UsageError(
                "--tensorboard", f"needs the tensorboard package ({e}); install it with: pip install tensorboard"
            ) from None
    return grid


def _check_cuda_graphs(args, config: RunConfig, device, world_size: int) -> None:
    """--cuda-graphs where it applies (step.graph_refusal), checked before any
    work: on the command line's settings, then on a resumed checkpoint's."""
    if not args.cuda_graphs:
        return
    if device == "auto":  # as cli.resolve_device will
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.sweep is not None:
        raise UsageError("--cuda-graphs", "not supported with --sweep; train each setting on its own")
    why = graph_refusal(config, device, world_size)
    if why is not None:
        raise UsageError("--cuda-graphs", why)


def _check_folders(args, out: Path, runs: list[SweepRun]) -> Dist:
    """Every folder usable (nothing is created yet); returns this process's place under torchrun."""
    for path in [out, *(r.out for r in runs)]:
        try:
            check_path(path)
        except RunFolderError as e:
            raise UsageError("--out", str(e)) from None
    d0 = dist_from_env()
    if args.resume:
        try:
            found = paths.kind(out / "checkpoint.pt") == paths.FILE
        except paths.PathError as e:
            raise UsageError("--resume", str(e)) from None
        if not found:
            raise UsageError("--resume", f"{out / 'checkpoint.pt'}: no such checkpoint file")
    return d0


def _lock_folders(folders: contextlib.ExitStack, args, out: Path, runs: list[SweepRun]) -> None:
    """Create and lock the run folders, refusing any that holds a run (nothing of the user's is overwritten;
    a sweep writes only sweep.csv beside its run folders)."""
    sweep = args.sweep is not None
    try:
        make_room_for_locks(1 + len(runs))
        folders.enter_context(RunFolder(out, create=not args.resume))
        for r in runs:
            folders.enter_context(RunFolder(r.out))
    except RunFolderError as e:
        raise UsageError("--out", str(e)) from None
    for path in [] if args.resume else [r.out for r in runs] if sweep else [out]:
        present = [name for name in RUN_FILES if os.path.lexists(path / name)]  # a dangling symlink too
        if present:
            hint = "add --resume to continue it or " if "checkpoint.pt" in present and not sweep else ""
            raise UsageError("--out", f"{path} already holds a run ({', '.join(present)}); {hint}choose another --out")
    if args.tensorboard and (out / "tensorboard").is_symlink():  # TensorBoard would write into its target
        raise UsageError("--tensorboard", f"{out / 'tensorboard'} is a symbolic link; refusing to write through it")
    if sweep and os.path.lexists(out / "sweep.csv"):
        raise UsageError("--out", f"{out / 'sweep.csv'} exists (an earlier sweep); choose another --out")


def _load_resume(args, out: Path, world_size: int) -> tuple[dict, RunConfig]:
    """The checkpoint to continue and its settings, checked against the command line and the process count."""
    ckpt_path = out / "checkpoint.pt"
    try:
        resume = checkpoint.load(ckpt_path, map_location="cpu", check=resume_problems)
    except checkpoint.CheckpointError as e:
        raise UsageError("--resume", str(e)) from None
    saved = RunConfig.from_checkpoint(resume["config"])
    given = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    normalized = saved.normalized()
    conflicts = [
        f"--{k.replace('_', '-')} {v} (checkpoint: {getattr(saved, k)})"
        for k, v in given.items()
        if getattr(normalized, k) != (recipes.torch_seed(v) if k == "seed" else v)
    ]
    if conflicts:
        raise UsageError(
            "--resume", "the run's settings come from the checkpoint; these differ: " + ", ".join(conflicts)
        )
    if resume["world_size"] != world_size:
        n = resume["world_size"]
        how = "without torchrun" if n == 1 else f"under torchrun --nproc_per_node={n}"
        raise UsageError(
            "--resume",
            f"{ckpt_path} was written by {n} training process(es), this run has "
            f"{world_size}; the batches of an epoch depend on it: resume {how}",
        )
    return resume, saved


def _load_data(parser, args, d: Dist) -> data.FashionMNIST:
    """Rank 0 loads (and downloads, if needed) first; the others then read the same files."""
    try:
        if d.main:
            ds = data.load(
                args.data_dir, verify=not args.no_verify, download=not args.no_download, progress=not args.no_progress
            )
        barrier(d)
        if not d.main:
            ds = data.load(args.data_dir, verify=not args.no_verify, download=False, progress=False)
    except data.DataError as e:
        cli.fail(parser, str(e))
    return ds


def _check_data(ds, d: Dist, resume: dict | None, out: Path) -> None:
    n = len(ds.train)
    if n // d.world_size < 2:
        raise UsageError(
            "--data-dir",
            f"the training split has {n} image(s): at least 2 per process "
            f"({d.world_size}) are needed (BatchNorm cannot train on one image)",
        )
    # checkpoints from before the field: unknown, not checked
    if resume is not None and resume.get("train_images", n) != n:
        raise UsageError(
            "--resume",
            f"{out / 'checkpoint.pt'} was trained on {resume['train_images']} training "
            f"images, these data have {n}; resume it with the same data",
        )
