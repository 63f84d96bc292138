"""One benchmark run: from parsed arguments to the report (a JSON-able dict).

In order: the machine description, its ceilings, every per-block row (with a
fresh torch.compile cache for the run), then the whole-model section
(model.py) on the same device. The CLI (cli.py) checks the arguments before
this starts and writes the outputs after.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

from . import impls
from .blocks import BLOCKS, PASS_DOC, PASSES
from .ceilings import measure_peaks
from .compile_cache import CompileState, prepare_compile, restore_compile_cache_dir
from .gate import ATOL_SCALE, RTOL
from .machine import loadavg, machine_description
from .model import run_section
from .rows import bench_rows
from .timing import ROUNDS, first_line

# 2: no in-process "model" key (the whole-model section is the model benchmark), no "reference" impl
SCHEMA = "fmnist_ext.benchmark/2"
DEFAULT_BATCH_SIZES = {"cpu": (1, 64, 256, 1000, 4096), "cuda": (1, 64, 256, 1000, 4096, 10000)}
QUICK_BATCH_SIZES = (1, 64)


def run(args: argparse.Namespace, repo_dir: Path | None = None, log=None) -> dict:
    """Measure everything `args` asks for; progress lines go to `log` (stderr by default)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fmnist-benchmark: --device cuda but torch sees no CUDA device")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("fmnist-benchmark: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if device.type == "cuda":
        # fp32 means fp32: TF32 convolutions/matmuls would not pass the gate
        # against an exact kernel and would inflate the sgemm ceiling.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    quick = args.quick
    batch_sizes = args.batch_sizes or list(QUICK_BATCH_SIZES if quick else DEFAULT_BATCH_SIZES[device.type])
    blocks = args.blocks or [1, 2]
    for b in blocks:
        if b not in BLOCKS:
            raise SystemExit(f"fmnist-benchmark: unknown block {b}; choose from {sorted(BLOCKS)}")
    impl_names = args.impls or list(impls.QUICK_IMPLS if quick else impls.IMPLS)
    unknown = [n for n in impl_names if n not in impls.IMPLS]
    if unknown:
        raise ValueError(f"--impls: unknown implementation(s) {unknown}; choose from {','.join(impls.IMPLS)}")
    if "stock" not in impl_names:
        impl_names = ["stock", *impl_names]
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.05 if quick else 1.0)
    torch.manual_seed(0)

    config = {
        "device": device.type,
        "threads": threads,
        "batch_sizes": batch_sizes,
        "blocks": blocks,
        "impls": impl_names,
        "passes": list(PASSES),
        "pass_doc": PASS_DOC,
        "quick": quick,
        "min_run_time_s": min_run_time,
        "rounds": ROUNDS,
        "dtype": "float32",
        "timing": "torch.utils.benchmark.Timer.blocked_autorange, implementations interleaved in rounds; "
        "median over all measured blocks of all rounds",
        "correctness_gate": f"elementwise |impl - stock| <= {ATOL_SCALE:g}*max|stock| + {RTOL:g}*|stock| for output "
        "and gradients, on the benchmarked inputs, before timing",
        "flop_convention": "forward F = 2*Cout*Hconv*Wconv*Cin*k*k per image (Hconv, Wconv: un-pooled conv output); "
        "weight grad ~F, input grad ~F; fwd=F, fwd+bwd=2F, fwd+bwd+dx=3F; bias/relu/pool not counted",
        "bytes_convention": "forward reads input, weight, bias and writes the pooled output; backward reads "
        "grad_output, input, weight and writes grad_weight, grad_bias (+ grad_input for fwd+bwd+dx); "
        "saved activations/indices not counted",
        "blocks_spec": {str(b): BLOCKS[b].describe() for b in blocks},
        "compile": "torch.compile(stock sequence, dynamic=False), dynamo reset before each row; compile_s is the "
        "wall time of the row's first call with inductor's FX-graph and AOTAutograd caches turned off and a "
        "fresh inductor cache directory for the run (kernels compiled for an earlier row of the same run can "
        "be reused); one-time start-up is measured once as compile_info.init_s",
    }
    machine = machine_description(device, threads, repo_dir)
    log(
        f"fmnist-benchmark: {device.type}, {threads} threads, batch sizes {batch_sizes}, impls {impl_names}"
        f"{', quick' if quick else ''}"
    )
    log("measuring machine ceilings (sgemm, copy) ...")
    peaks = measure_peaks(device, threads, quick)

    base = impls.base_impls()
    impl_fns: dict[str, impls.Impl | None] = {n: None if n == "compile" else base[n] for n in impl_names}
    compile_state = CompileState()
    compile_info = None
    if "compile" in impl_names:
        compile_info = prepare_compile(device, compile_state)
        log(
            "torch.compile: start-up "
            + (
                f"{compile_info['init_s']:.1f} s"
                if "init_s" in compile_info
                else f"failed ({compile_info.get('failed')})"
            )
        )
    rows: list[dict] = []
    try:
        bench_rows(blocks, batch_sizes, impl_fns, device, threads, min_run_time, peaks, compile_state, rows, log)
    finally:
        if compile_info and compile_info.get("fresh_cache_dir"):
            restore_compile_cache_dir(compile_info)
    if compile_info is not None:
        config["compile_info"] = {k: v for k, v in compile_info.items() if not k.startswith("_")}
    whole_model = None
    if args.no_model:
        config["whole_model"] = "not run (--no-model)"
    else:
        config["whole_model"] = f"python -m fmnist_ext.benchmark.model --device {device.type}" + (
            " --quick, training step and epoch of stock and fused only" if quick else ""
        )
        whole_model = _whole_model(device.type, threads, quick, log)
    report = {
        "schema": SCHEMA,
        "config": config,
        "machine": machine,
        "peaks": peaks,
        "rows": rows,
        "whole_model": whole_model,
        "duration_s": time.perf_counter() - t_start,
    }
    machine["loadavg_at_end"] = loadavg()
    return report


def _whole_model(device: str, threads: int, quick: bool, log) -> dict:
    """The whole-model section on `device` (one process per implementation;
    quick: the training step and epoch of stock and fused only). A failure of
    the section itself is recorded, not raised: the per-block rows measured so
    far stay. (cli.py refuses a device the section cannot run on before any timing.)"""
    log(f"whole model on {device}, one process per implementation (python -m fmnist_ext.benchmark.model) ...")
    try:
        return run_section(quick=quick, threads=threads, log=log, training_only=quick, device=device)
    except Exception as exc:
        traceback.print_exc()
        return {"skipped": f"{type(exc).__name__}: {first_line(exc)}"}
