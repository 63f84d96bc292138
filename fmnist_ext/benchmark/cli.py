"""The command line of the benchmark (`fmnist-benchmark`, `python python/benchmark.py`,
`python -m fmnist_ext.benchmark`): options, checks made before any timing, and
the output files.

Every bad argument is a one-line error with exit 2 before anything is timed,
so a long run cannot end with its results unwritable; the files are written
atomically and before stdout, so `... | head` closing the pipe loses none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import atomic, clirun, outputs
from .. import cli as app_cli
from . import model, render, runner
from .blocks import BLOCKS
from .chart import render_png
from .impls import IMPLS, NOT_IMPLS

MAX_BATCH = 100_000  # a block's input at this batch is 0.3 GB; far beyond it is an allocation failure, not a figure


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(not 1 <= v <= MAX_BATCH for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers in [1, {MAX_BATCH}], got {text!r}")
    return vals


def _impl_list(text: str) -> list[str]:
    vals = [t.strip() for t in text.split(",") if t.strip()]
    bad = [v for v in vals if v not in IMPLS and v not in NOT_IMPLS]  # NOT_IMPLS: check_arguments says why
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown implementation(s) {bad}; choose from {','.join(IMPLS)}")
    return vals


def _block_list(text: str) -> list[int]:
    vals = _int_list(text)
    bad = [v for v in vals if v not in BLOCKS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown block(s) {bad}; choose from {','.join(map(str, sorted(BLOCKS)))}")
    return vals


OUTPUTS = ("json", "png", "markdown")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Before any timing (one line, exit 2): every output path must be writable (and --png a
    format matplotlib writes), no two the same file, so the results of a long run are not
    lost; --impls names no retired implementation (NOT_IMPLS, with why); --device cuda needs
    a CUDA device, and, unless --no-model, the fused op's compiled CUDA kernels (the
    whole-model section would otherwise time the reference as "fused"). (The numbers
    are checked by their argparse types.)"""
    try:
        outputs.check_outputs({f"--{name}": getattr(args, name) for name in OUTPUTS}, figures=("--png",))
    except outputs.OutputError as e:
        app_cli.fail(parser, str(e))
    for name in args.impls or ():
        if name in NOT_IMPLS:
            app_cli.fail(parser, f"argument --impls: {name!r} {NOT_IMPLS[name]}; choose from {','.join(IMPLS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        app_cli.fail(parser, "argument --device: cuda requested but torch sees no CUDA device")
    refusal = None if args.no_model else model.device_refusal(args.device)
    if refusal:
        app_cli.fail(parser, f"argument --device: {refusal} (--no-model times the per-block rows only)")


def write_outputs(args: argparse.Namespace, report: dict, md: str) -> list[str]:
    """Write the requested files atomically; the errors (one line each) of those that failed."""
    writers = {
        "json": lambda path: atomic.write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n"),
        "png": lambda path: render_png(report, path),
        "markdown": lambda path: atomic.write_text(path, md),
    }
    errors = []
    for name in OUTPUTS:  # the JSON first: it holds everything
        path = getattr(args, name)
        if path is None:
            continue
        try:
            writers[name](path)
        except (OSError, ValueError) as e:
            errors.append(
                f"fmnist-benchmark: error: argument --{name}: cannot write {path}: {getattr(e, 'strerror', None) or e}"
            )
    return errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fmnist-benchmark",
        description="Time the fused Conv2d+ReLU+MaxPool2d op against stock PyTorch and torch.compile, "
        "per conv block and batch size, plus the whole-model section on the same device: training "
        "step and epoch, eval inference, each implementation in its own process.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--threads", type=app_cli.thread_count, default=None, help="torch threads for CPU (default: torch's default)"
    )
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=None,
        help="comma-separated (default 1,64,256,1000,4096 on CPU; plus 10000 on CUDA)",
    )
    p.add_argument("--blocks", type=_block_list, default=None, help="conv blocks to time: 1, 2 (default both)")
    p.add_argument(
        "--impls",
        type=_impl_list,
        default=None,
        help=f"comma-separated from {','.join(IMPLS)} (default all; stock is always timed)",
    )
    p.add_argument(
        "--no-model", action="store_true", help="skip the whole-model section (python -m fmnist_ext.benchmark.model)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch 1,64, no compile, short timings, whole model: training step and epoch only "
        "(explicit flags win)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every figure and the machine description here")
    p.add_argument(
        "--png",
        type=Path,
        default=None,
        help="write the speedup chart here (format from the extension: png, svg, pdf, ...)",
    )
    p.add_argument("--markdown", type=Path, default=None, help="also write the markdown table here")
    p.add_argument(
        "--min-run-time",
        type=app_cli.positive_float,
        default=None,
        help="seconds of measurement per implementation and row, split over the interleaving rounds "
        "(default 1.0; 0.05 with --quick)",
    )
    return p


@clirun.guarded("fmnist_ext.benchmark", name="fmnist-benchmark")  # the name its errors use
def main(argv: list[str] | None = None, repo_dir: Path | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    app_cli.refuse_bad_cpu_isa(parser)
    check_arguments(parser, args)
    report = runner.run(args, repo_dir)
    md = render.render_markdown(report)
    # Files before stdout: `... | head` closing the pipe must not lose them.
    errors = write_outputs(args, report, md)
    for line in errors:
        print(line, file=sys.stderr)
    sys.stdout.write(md)
    sys.stdout.flush()
    return 1 if errors else 0
