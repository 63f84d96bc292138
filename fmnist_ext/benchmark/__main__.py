"""The benchmark's command line: `python -m fmnist_ext.benchmark`, `python python/benchmark.py`,
`fmnist-benchmark`. Every bad argument is a one-line error (exit 2) before anything is
timed, so a long run cannot end with its results unwritable; the files are written
atomically, and before stdout, so `... | head` closing the pipe loses none."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from .. import atomic
from . import blocks, measure, report, whole_model
from .measure import cli
from .whole_model import ALLOCATORS

SCHEMA = "fmnist_ext.benchmark/3"
BATCH_SIZES = {"cpu": [1, 64, 256, 1000, 4096], "cuda": [1, 64, 256, 1000, 4096, 10000], "quick": [1, 64]}
QUICK_IMPLS = ["fused", "stock", "inference"]  # with --quick, unless --impls says otherwise
ALL_IMPLS = list(dict.fromkeys([*blocks.IMPLS, *whole_model.TRAIN, *whole_model.INFER]))
MAX_BATCH = 100_000  # a block's input is 0.3 GB there; far beyond it is an allocation failure, not a figure
OUTPUTS = ("json", "png", "markdown")


def _list(kind, what: str, choices=None):
    """An argparse type: comma-separated `what`, each `kind(text)` (and one of `choices`), none twice."""

    def parse(text: str) -> list:
        try:
            vals = [kind(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        bad = [v for v in vals if choices is not None and v not in choices]
        if bad or not vals or len(set(vals)) < len(vals):
            why = f"unknown {','.join(map(str, bad))}" if bad else "empty or repeated"
            raise argparse.ArgumentTypeError(f"{why} in {text!r}; choose from {','.join(map(str, choices or []))}")
        return vals

    return parse


def _batch(text: str) -> int:
    """A batch size: an integer in [1, MAX_BATCH] (ValueError otherwise)."""
    if not 1 <= int(text) <= MAX_BATCH:
        raise ValueError(f"not in [1, {MAX_BATCH}]")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineErrorParser(
        prog="fmnist-benchmark",
        description="Time the fused Conv2d+ReLU+MaxPool2d op against stock PyTorch and torch.compile: per conv "
        "block of the seed CNN (passes and batch sizes, interleaved in one process), then the whole model "
        "(training step and epoch, eval inference; each implementation in its own process, best of rounds). "
        "Every implementation is checked against stock on the timed inputs first, and refused if it differs.",
        epilog="--quick: per-block batch sizes 1,64 and 0.05 s per row; whole model at batch 256 with a 3-step "
        "epoch, eval at batch 1,64, one round, default allocator, no profile; implementations "
        f"{','.join(QUICK_IMPLS)}. Explicit flags win. Each section times the implementations of --impls it has, "
        "and stock always. Allocator settings: default (glibc's) and tuned ("
        + " ".join(f"{k}={v}" for k, v in ALLOCATORS["tuned"].items())
        + "); on cuda only default.",
    )
    names, allocators = _list(str, "names", ALL_IMPLS), _list(str, "names", list(ALLOCATORS))
    block_numbers = _list(int, "block numbers", list(blocks.BLOCKS))
    batch_sizes = _list(_batch, f"batch sizes in [1, {MAX_BATCH}]")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where everything runs (default cpu)")
    p.add_argument("--threads", type=cli.thread_count, metavar="N", help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke run, about a minute (see below)")
    p.add_argument("--impls", type=names, metavar="LIST", help=f"from {','.join(ALL_IMPLS)} (default all)")
    p.add_argument("--blocks", type=block_numbers, metavar="LIST", default=[1, 2], help="conv blocks (default 1,2)")
    p.add_argument("--batch-sizes", type=batch_sizes, metavar="LIST", help="default 1,64,256,1000,4096 (cuda +10000)")
    p.add_argument(
        "--min-run-time", type=cli.positive_float, metavar="S", help="seconds per block row and impl (default 1)"
    )
    p.add_argument("--no-blocks", action="store_true", help="skip the per-block rows")
    p.add_argument("--no-model", action="store_true", help="skip the whole model")
    p.add_argument("--rounds", type=cli.positive_int, metavar="N", help="whole model: rounds, best kept (default 2)")
    p.add_argument("--allocators", type=allocators, metavar="LIST", help="whole model: default,tuned")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every figure and the machine description here")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="write the markdown report here (also printed)")
    p.add_argument("--png", type=Path, metavar="PATH", help="write the block speedup chart here (.png, .svg, .pdf)")
    return p


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks argparse's types cannot make, before any timing (one line, exit 2)."""
    try:
        cli.check_outputs({f"--{name}": getattr(args, name) for name in OUTPUTS}, figures=("--png",))
    except cli.OutputError as e:
        cli.fail(parser, str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        cli.fail(parser, "argument --device: cuda requested but torch sees no CUDA device")
    if args.no_blocks and args.no_model:
        cli.fail(parser, "argument --no-model: not allowed with --no-blocks (nothing would be timed)")
    if args.no_blocks and args.png:
        cli.fail(parser, "argument --png: the chart is of the per-block rows, which --no-blocks skips")
    if not args.no_model:
        not_here = [a for a in args.allocators or () if a not in whole_model.DEVICE_ALLOCATORS[args.device]]
        if not_here:
            why = f"changes glibc's malloc, which holds no {args.device} tensors"
            cli.fail(parser, f"argument --allocators: {','.join(not_here)} {why}")
        refusal = whole_model.device_refusal(args.device)
        if refusal:
            cli.fail(parser, f"argument --device: {refusal} (--no-model times the per-block rows only)")


def run(args: argparse.Namespace, repo_dir: Path | None = None, log=None) -> dict:
    """Everything `args` asks for, as the report (a JSON-able dict); progress lines to `log` (stderr)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start, device = time.perf_counter(), torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    measure.fp32_means_fp32(device)
    torch.manual_seed(0)
    impls = args.impls or (QUICK_IMPLS if args.quick else ALL_IMPLS)
    block_impls = [n for n in blocks.IMPLS if n in ("stock", *impls)]
    cfg = {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "impls": block_impls,
        "blocks": [] if args.no_blocks else args.blocks,
        "batch_sizes": args.batch_sizes or BATCH_SIZES["quick" if args.quick else device.type],
        "passes": blocks.PASSES,
        "blocks_spec": {b: blocks.BLOCKS[b].describe() for b in args.blocks},
        "min_run_time_s": args.min_run_time or (0.05 if args.quick else 1.0),
        "rounds": blocks.ROUNDS,
        "timing": "torch.utils.benchmark blocked_autorange, interleaved in rounds, order rotated; median of all",
        "correctness_gate": measure.GATE,
        "flops_and_bytes": "conventions: fmnist_ext/benchmark/blocks.py",
    }
    desc = measure.machine(device, cfg["threads"], repo_dir)
    log(f"fmnist-benchmark: {device.type}, {cfg['threads']} threads, {','.join(impls)}{', quick' * args.quick}")
    log("measuring the machine's ceilings (sgemm, copy) ...")
    rows: list[dict] = []  # filled as measured: the rows done survive a failure
    out = {"schema": SCHEMA, "config": cfg, "machine": desc, "rows": rows, "whole_model": None}
    out["ceilings"] = measure.ceilings(device, cfg["threads"], args.quick)
    with measure.cold_compiles():
        cfg["compile_startup_s"] = blocks.bench_rows(cfg, device, out["ceilings"], rows, log)
    if not args.no_model:
        log("whole model, one process per implementation ...")
        try:
            out["whole_model"] = whole_model.run_section(
                device.type, args.quick, impls, args.allocators, args.rounds, cfg["threads"], log
            )
        except Exception as exc:  # the per-block rows measured so far stay
            traceback.print_exc()
            out["whole_model"] = {"skipped": measure.first_line(exc)}
    desc["loadavg_at_end"] = measure.loadavg()
    out["duration_s"] = time.perf_counter() - t_start
    return out


def write_outputs(args: argparse.Namespace, rep: dict, md: str) -> list[str]:
    """Write the requested files atomically, the JSON first (it holds everything); the
    one-line errors of those that failed."""
    writers = {
        "json": lambda path: atomic.write_text(path, json.dumps(rep, indent=2, allow_nan=False) + "\n"),
        "png": lambda path: report.render_png(rep, path),
        "markdown": lambda path: atomic.write_text(path, md),
    }
    errors = []
    for name in OUTPUTS:
        path = getattr(args, name)
        try:
            if path is not None:
                writers[name](path)
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or e
            errors.append(f"fmnist-benchmark: error: argument --{name}: cannot write {path}: {why}")
    return errors


@cli.guarded("fmnist_ext.benchmark", name="fmnist-benchmark")
def main(argv: list[str] | None = None, repo_dir: Path | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.refuse_bad_cpu_isa(parser)
    check_arguments(parser, args)
    rep = run(args, repo_dir)
    md = report.render_markdown(rep)
    errors = write_outputs(args, rep, md)  # files before stdout: `... | head` closing the pipe must not lose them
    for line in errors:
        print(line, file=sys.stderr)
    sys.stdout.write(md)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
