"""Benchmark of the fused Conv2d+ReLU+MaxPool2d operator against stock PyTorch.

    python python/benchmark.py [--device cpu|cuda] [--threads N]
        [--batch-sizes 1,64,256,1000,4096] [--blocks 1,2]
        [--impls fused,stock,compile,reference] [--no-model] [--quick]
        [--json PATH] [--png PATH] [--markdown PATH] [--min-run-time SECONDS]

(also ``fmnist-benchmark ...`` once installed, or ``python -m fmnist_ext.benchmark``
from outside the source tree).

What it measures, all in one process and one run:

* the machine's ceilings: a large float32 matmul (GFLOP/s) and a large copy
  (GB/s) on the benchmarked device;
* per conv block of the seed CNN and per batch size, three passes --
  ``fwd`` (forward under no_grad), ``fwd+bwd`` (forward and backward for weight
  and bias only: the model's first block needs no input gradient) and
  ``fwd+bwd+dx`` (also the input gradient) -- for four implementations:
  ``fused`` (fmnist_ext.conv_relu_maxpool2d), ``stock`` (F.conv2d, F.relu,
  F.max_pool2d in eager mode), ``compile`` (torch.compile of the stock
  sequence; compile time reported separately) and ``reference`` (the
  pure-PyTorch fallback path of fmnist_ext, called directly);
* the whole seed CNN: one training step (forward, cross-entropy, backward,
  Adam) and one epoch (60 steps at batch 1000) on synthetic data, fused vs
  stock;
* on CPU and not with --quick, the whole-model section of
  fmnist_ext.bench_model (each implementation in its own process: training
  step and epoch, eval inference at batch 1 and 1000 including
  FashionCNN.for_inference(), torch.compile, a per-layer profile of the fused
  step, both allocator settings).

Before any timing, each implementation's output (and, for the backward
passes, its gradients) is compared with stock on the very inputs that are
then timed; an implementation that does not match is not timed and its row
reads ``REFUSED: <why>``.

Times are medians of torch.utils.benchmark measurements (which synchronize
CUDA); the implementations of one row are interleaved in rounds, in the same
process on the same tensors. Every figure printed is a time measured in this
run or a ratio of such times.

FLOP convention (per image, the dense computation stock performs):
  forward      F = 2 * C_out * H_conv * W_conv * C_in * k * k   (H_conv, W_conv:
               the un-pooled convolution output; bias, ReLU and pooling are
               not counted)
  weight grad  ~ F;  input grad ~ F
  so fwd = F, fwd+bwd = 2F, fwd+bwd+dx = 3F. An implementation that skips work
  (the fused backward only visits pool winners) is credited with the same
  FLOPs, so its GFLOP/s is an "effective" rate.
Byte convention (minimal traffic of separate forward and backward ops, each
reading its operands once and writing its results once; saved activations or
indices are not counted):
  forward      read input, weight, bias; write pooled output
  backward     read grad_output, input, weight; write grad_weight, grad_bias
               (+ write grad_input for fwd+bwd+dx)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import benchmark as tbench

from . import atomic, cli, clirun, outputs

SCHEMA = "fmnist_ext.benchmark/1"

IMPLS = ("fused", "stock", "compile", "reference")
PASSES = ("fwd", "fwd+bwd", "fwd+bwd+dx")
PASS_DOC = {
    "fwd": "forward under torch.no_grad()",
    "fwd+bwd": "forward + backward for weight and bias (input.requires_grad=False)",
    "fwd+bwd+dx": "forward + backward for input, weight and bias",
}
DEFAULT_BATCH_SIZES = {"cpu": (1, 64, 256, 1000, 4096), "cuda": (1, 64, 256, 1000, 4096, 10000)}
QUICK_BATCH_SIZES = (1, 64)
QUICK_IMPLS = ("fused", "stock", "reference")
ROUNDS = 3  # interleaving rounds per row (each impl measured once per round)

# Correctness gate (float32; float64 would allow tighter): |impl - stock| <=
# ATOL_SCALE * max|stock| + RTOL * |stock|, elementwise, for the output and
# every gradient.
RTOL = 1e-4
ATOL_SCALE = 1e-4
STOCK_ERROR_FACTOR = 4.0  # with a float64 reference: "about as accurate as stock"

# Fashion-MNIST normalisation (train-set mean / std of pixel/255), used to
# turn synthetic uint8 images into realistic inputs.
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530

MODEL_BATCH = 1000
MODEL_EPOCH_STEPS = 60
MODEL_LR = 0.01


# ----------------------------------------------------------------------------
# Blocks and the cost model
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSpec:
    index: int
    cin: int
    cout: int
    hw: int  # input height = width
    k: int = 5
    pool: int = 2
    padding: int = 0

    @property
    def conv_hw(self) -> int:
        return self.hw + 2 * self.padding - self.k + 1

    @property
    def out_hw(self) -> int:
        return self.conv_hw // self.pool

    def describe(self) -> str:
        return (
            f"block {self.index}: [B,{self.cin},{self.hw},{self.hw}], conv {self.cin}->{self.cout} "
            f"{self.k}x{self.k}, relu, maxpool {self.pool}"
        )

    def flops(self, batch: int, pass_name: str) -> int:
        fwd = 2 * self.cout * self.conv_hw * self.conv_hw * self.cin * self.k * self.k * batch
        return fwd * {"fwd": 1, "fwd+bwd": 2, "fwd+bwd+dx": 3}[pass_name]

    def bytes_moved(self, batch: int, pass_name: str, itemsize: int = 4) -> int:
        x = batch * self.cin * self.hw * self.hw
        w = self.cout * self.cin * self.k * self.k
        b = self.cout
        y = batch * self.cout * self.out_hw * self.out_hw
        n = x + w + b + y  # forward
        if pass_name != "fwd":
            n += y + x + w + w + b  # backward: read g, x, w; write dw, db
        if pass_name == "fwd+bwd+dx":
            n += x  # write dx
        return n * itemsize


BLOCKS = {1: BlockSpec(1, cin=1, cout=6, hw=28), 2: BlockSpec(2, cin=6, cout=12, hw=12)}


# ----------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------

Impl = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def stock_block(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The stock eager sequence: F.conv2d, F.relu, F.max_pool2d (pool 2, padding 0)."""
    return F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2, 2)


def fused_block(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    import fmnist_ext

    return fmnist_ext.conv_relu_maxpool2d(x, w, b, padding=0, pool=2)


def reference_block(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    from fmnist_ext.op import reference

    return reference.conv_relu_maxpool2d(x, w, b, (0, 0), 2)


def base_impls() -> dict[str, Impl]:
    """The eager implementations (compile is built per row)."""
    return {"fused": fused_block, "stock": stock_block, "reference": reference_block}


@dataclass
class RowInputs:
    block: BlockSpec
    batch: int
    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    g: torch.Tensor  # fixed random grad_output


def make_inputs(block: BlockSpec, batch: int, device: torch.device, seed: int = 0) -> RowInputs:
    """Inputs like the model's: block 1 gets normalised uint8-like images,
    block 2 gets standard-normal activations; weights and bias have
    nn.Conv2d's default initialisation; grad_output is a fixed random tensor."""
    gen = torch.Generator().manual_seed(seed * 1009 + block.index * 31 + batch)
    shape = (batch, block.cin, block.hw, block.hw)
    if block.index == 1:
        x = torch.randint(0, 256, shape, generator=gen).float().div_(255).sub_(FMNIST_MEAN).div_(FMNIST_STD)
    else:
        x = torch.randn(shape, generator=gen)
    fan_in = block.cin * block.k * block.k
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) gives the same bound
    w = (torch.rand((block.cout, block.cin, block.k, block.k), generator=gen) * 2 - 1) * bound
    b = (torch.rand((block.cout,), generator=gen) * 2 - 1) * bound
    g = torch.randn((batch, block.cout, block.out_hw, block.out_hw), generator=gen)
    return RowInputs(block, batch, *(t.to(device).contiguous() for t in (x, w, b, g)))


def pass_runner(fn: Impl, inp: RowInputs, pass_name: str) -> Callable[[], Any]:
    """A no-argument callable doing one `pass_name` of `fn` on `inp`.

    Backward uses torch.autograd.grad with the fixed grad_output (equivalent to
    y.backward(g) without accumulating into .grad)."""
    x, b, g = inp.x, inp.b, inp.g
    if pass_name == "fwd":
        w = inp.w

        def run_fwd():
            with torch.no_grad():
                return (fn(x, w, b),)

        return run_fwd
    w = inp.w.detach().requires_grad_(True)
    bb = b.detach().requires_grad_(True)
    if pass_name == "fwd+bwd":
        xx = x.detach()

        def run_bwd():
            y = fn(xx, w, bb)
            return (y.detach(), *torch.autograd.grad(y, (w, bb), g))

        return run_bwd
    if pass_name == "fwd+bwd+dx":
        xx = x.detach().requires_grad_(True)

        def run_bwd_dx():
            y = fn(xx, w, bb)
            return (y.detach(), *torch.autograd.grad(y, (xx, w, bb), g))

        return run_bwd_dx
    raise ValueError(f"unknown pass {pass_name!r}")


RESULT_NAMES = {
    "fwd": ("output",),
    "fwd+bwd": ("output", "grad_weight", "grad_bias"),
    "fwd+bwd+dx": ("output", "grad_input", "grad_weight", "grad_bias"),
}


# ----------------------------------------------------------------------------
# Correctness gate
# ----------------------------------------------------------------------------


@dataclass
class CheckResult:
    ok: bool
    reason: str | None = None
    max_rel_err: dict[str, float] = field(default_factory=dict)  # max|diff| / max|stock| per tensor

    def to_json(self) -> dict:
        return {"ok": self.ok, "reason": self.reason, "max_rel_err": self.max_rel_err}


def compare_results(
    got: Sequence[torch.Tensor],
    want: Sequence[torch.Tensor],
    names: Sequence[str],
    rtol: float = RTOL,
    atol_scale: float = ATOL_SCALE,
    exact: Sequence[torch.Tensor] | None = None,
) -> CheckResult:
    """Elementwise |got - want| <= atol_scale * max|want| + rtol * |want| for each tensor.

    With `exact` (the stock sequence computed in float64 on the same inputs),
    both are compared with it instead, and an implementation passes when it is
    about as accurate as stock: |got - exact| <= max(atol_scale * max|exact|,
    STOCK_ERROR_FACTOR * max|want - exact|) + rtol * |exact|. Large batches
    sum hundreds of thousands of float32 terms into each weight gradient, so
    two correct implementations that add in different orders differ by more
    than a fixed tolerance; stock's own error is the yardstick there.
    """
    errs: dict[str, float] = {}
    if len(got) != len(want):
        return CheckResult(False, f"returned {len(got)} tensors, expected {len(want)}")
    for name, a, r in zip(names, got, want):
        if not isinstance(a, torch.Tensor):
            return CheckResult(False, f"{name} is {type(a).__name__}, not a tensor", errs)
        if a.shape != r.shape:
            return CheckResult(False, f"{name} has shape {tuple(a.shape)}, stock {tuple(r.shape)}", errs)
        if a.dtype != r.dtype:
            return CheckResult(False, f"{name} has dtype {a.dtype}, stock {r.dtype}", errs)
        a = a.detach().double()
        r = r.detach().double()
        if not torch.isfinite(a).all():
            return CheckResult(False, f"{name} has non-finite values", errs)
        what = "stock"
        atol = atol_scale * (r.abs().max().item() if r.numel() else 0.0)
        if exact is not None:
            e = exact[len(errs)].detach().double().to(r.device)
            stock_err = (r - e).abs().max().item() if r.numel() else 0.0
            atol = max(atol_scale * (e.abs().max().item() if e.numel() else 0.0), STOCK_ERROR_FACTOR * stock_err)
            r, what = e, "the float64 reference"
        scale = r.abs().max().item() if r.numel() else 0.0
        diff = (a - r).abs()
        max_diff = diff.max().item() if diff.numel() else 0.0
        errs[name] = max_diff / scale if scale > 0 else max_diff
        bad = diff > (atol + rtol * r.abs())
        n_bad = int(bad.sum().item())
        if n_bad:
            return CheckResult(
                False,
                f"{name} differs from {what} at {n_bad}/{r.numel()} elements "
                f"(max |diff| {max_diff:.3g}, max |ref| {scale:.3g}, rtol {rtol:g}, atol {atol:.3g})",
                errs,
            )
    return CheckResult(True, None, errs)


def check_implementation(
    fn: Impl,
    inp: RowInputs,
    pass_name: str,
    expected: Sequence[torch.Tensor] | None = None,
    rtol: float = RTOL,
    atol_scale: float = ATOL_SCALE,
    exact: Sequence[torch.Tensor] | None = None,
) -> CheckResult:
    """Run `fn` for `pass_name` on `inp` and compare output (and gradients)
    with the stock sequence on the same inputs (and, given `exact`, with its
    float64 result; see compare_results). Exceptions count as failures."""
    if expected is None:
        expected = pass_runner(stock_block, inp, pass_name)()
    try:
        got = pass_runner(fn, inp, pass_name)()
    except Exception as exc:
        return CheckResult(False, f"raised {type(exc).__name__}: {_first_line(exc)}")
    _sync(inp.x.device)
    return compare_results(got, expected, RESULT_NAMES[pass_name], rtol, atol_scale, exact)


# ----------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line[:limit]


def _timer(run: Callable[[], Any], label: str, threads: int) -> tbench.Timer:
    return tbench.Timer(stmt="run()", globals={"run": run}, label=label, num_threads=threads)


def _summarise(times: list[float]) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "iqr_s": q[2] - q[0],
        "min_s": times[0],
        "n_measurements": len(times),
    }


def time_interleaved(
    runs: dict[str, Callable[[], Any]],
    min_run_time: float,
    threads: int,
    rounds: int = ROUNDS,
    label: str = "",
) -> dict[str, dict]:
    """Median per-call time of each callable, measured in `rounds` rounds that
    visit every callable once (order rotated each round) with
    Timer.blocked_autorange(min_run_time / rounds)."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round = min_run_time / rounds
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for name in order:
            m = _timer(runs[name], f"{label} {name}", threads).blocked_autorange(min_run_time=per_round)
            times[name].extend(m.times)
    return {n: _summarise(t) for n, t in times.items()}


# ----------------------------------------------------------------------------
# Machine ceilings
# ----------------------------------------------------------------------------


def measure_peaks(device: torch.device, threads: int, quick: bool) -> dict:
    """A large float32 matmul (GFLOP/s) and a large copy (GB/s) on `device`.

    Copy bandwidth counts the bytes read plus the bytes written."""
    n = 1024 if quick else 4096
    copy_mb = 64 if quick else 256
    min_run = 0.2 if quick else 1.0
    a = torch.randn(n, n, device=device)
    bm = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    m = _timer(lambda: torch.mm(a, bm, out=c), "sgemm", threads).blocked_autorange(min_run_time=min_run)
    sgemm_s = m.median
    del a, bm, c
    numel = copy_mb * (1 << 20) // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    m2 = _timer(lambda: dst.copy_(src), "copy", threads).blocked_autorange(min_run_time=min_run)
    copy_s = m2.median
    nbytes = src.numel() * src.element_size()
    del src, dst
    return {
        "sgemm": {
            "what": f"torch.mm of two float32 {n}x{n} matrices, FLOPs = 2*n^3",
            "n": n,
            "median_s": sgemm_s,
            "gflops": 2 * n**3 / sgemm_s / 1e9,
        },
        "copy": {
            "what": f"dst.copy_(src) of a {copy_mb} MiB float32 tensor, bytes = read + write",
            "bytes": 2 * nbytes,
            "median_s": copy_s,
            "gbps": 2 * nbytes / copy_s / 1e9,
        },
    }


# ----------------------------------------------------------------------------
# Per-block rows
# ----------------------------------------------------------------------------


@dataclass
class CompileState:
    """torch.compile availability across rows: after the first failure the
    remaining rows are skipped with that reason."""

    failed_reason: str | None = None


def _disable_compile_caches() -> dict:
    """Turn off inductor's FX-graph cache and AOTAutograd's cache, so the
    reported compile time is a cold compile, not a hit in a cache left by an
    earlier run. Returns the settings (recorded in the JSON)."""
    settings = {}
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        for mod, name in ((inductor_config, "fx_graph_cache"), (functorch_config, "enable_autograd_cache")):
            if hasattr(mod, name):
                setattr(mod, name, False)
                settings[name] = False
    except ImportError:
        pass
    return settings


def _prepare_compile(device: torch.device, state: CompileState) -> dict:
    """Before the first row: point inductor (and triton) at a fresh cache
    directory for this run, unless the user chose one, so compile times are
    not hits in caches left by earlier runs; then compile a trivial function
    once, so that one-time start-up (imports, toolchain checks) is reported as
    `init_s` and not charged to the first row. A failure here skips compile
    for every row, with the reason."""
    import shutil
    import tempfile

    info: dict[str, Any] = {"caches": _disable_compile_caches()}
    user_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:  # importing torch._dynamo sets the variable to the default directory
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if user_dir is not None and os.path.abspath(user_dir) == os.path.abspath(default_cache_dir()):
            user_dir = None
    except Exception:
        pass
    if user_dir is None:
        d = tempfile.mkdtemp(prefix="fmnist-bench-inductor-")
        info.update(fresh_cache_dir=True, _dir=d, _shutil=shutil, _previous=os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
        if "TRITON_CACHE_DIR" not in os.environ:
            os.environ["TRITON_CACHE_DIR"] = os.path.join(d, "triton")
            info["_triton"] = True
    else:
        info.update(fresh_cache_dir=False, cache_dir=os.environ["TORCHINDUCTOR_CACHE_DIR"])
    try:
        import torch._dynamo

        torch._dynamo.reset()
        t = torch.randn(8, device=device)
        t0 = time.perf_counter()
        torch.compile(lambda v: torch.relu(v * 2.0) + 1.0, dynamic=False)(t)
        _sync(device)
        info["init_s"] = time.perf_counter() - t0
    except Exception as exc:
        state.failed_reason = f"{type(exc).__name__}: {_first_line(exc)}"
        info["failed"] = state.failed_reason
    return info


def _restore_compile_cache_dir(info: dict) -> None:
    if info.get("_previous") is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = info["_previous"]
    if info.get("_triton"):
        os.environ.pop("TRITON_CACHE_DIR", None)
    info["_shutil"].rmtree(info["_dir"], ignore_errors=True)


def _compile_runner(inp: RowInputs, pass_name: str, state: CompileState):
    """torch.compile the stock sequence for this row; return (runner, compile_s)
    or raise. Dynamo is reset so every row compiles its own static graph."""
    import torch._dynamo

    _disable_compile_caches()
    torch._dynamo.reset()
    compiled = torch.compile(stock_block, dynamic=False)
    run = pass_runner(compiled, inp, pass_name)
    t0 = time.perf_counter()
    run()  # first call traces and compiles (forward, and backward for the bwd passes)
    _sync(inp.x.device)
    compile_s = time.perf_counter() - t0
    return compiled, compile_s


def bench_row(
    block: BlockSpec,
    batch: int,
    pass_name: str,
    impls: dict[str, Impl | None],
    device: torch.device,
    threads: int,
    min_run_time: float,
    peaks: dict | None,
    compile_state: CompileState | None = None,
    rounds: int = ROUNDS,
) -> list[dict]:
    """One row: every implementation of `impls` (name -> callable; None for
    "compile", built here) checked against stock on the same inputs, then the
    ones that pass timed interleaved. Returns one record per implementation.
    Stock is always measured (it is the baseline of the ratios)."""
    compile_state = compile_state or CompileState()
    inp = make_inputs(block, batch, device)
    expected = pass_runner(stock_block, inp, pass_name)()
    # The same in float64: the yardstick for the gate (compare_results).
    inp64 = RowInputs(inp.block, inp.batch, *(t.double() for t in (inp.x, inp.w, inp.b, inp.g)))
    exact = pass_runner(stock_block, inp64, pass_name)()
    _sync(device)
    records: dict[str, dict] = {}
    runs: dict[str, Callable[[], Any]] = {}
    order = ["stock"] + [n for n in impls if n != "stock"]
    flops = block.flops(batch, pass_name)
    nbytes = block.bytes_moved(batch, pass_name, inp.x.element_size())
    for name in order:
        rec = {
            "block": block.index,
            "batch": batch,
            "pass": pass_name,
            "impl": name,
            "status": "ok",
            "reason": None,
            "flops": flops,
            "bytes": nbytes,
        }
        records[name] = rec
        fn = stock_block if name == "stock" else impls[name]
        if name == "compile" and fn is None:
            rec["compile_s"] = None
            if compile_state.failed_reason is not None:
                rec.update(status="skipped", reason=f"torch.compile unavailable: {compile_state.failed_reason}")
                continue
            try:
                fn, rec["compile_s"] = _compile_runner(inp, pass_name, compile_state)
            except Exception as exc:
                compile_state.failed_reason = f"{type(exc).__name__}: {_first_line(exc)}"
                rec.update(status="skipped", reason=f"torch.compile failed: {compile_state.failed_reason}")
                continue
        check = check_implementation(fn, inp, pass_name, expected, exact=exact)
        rec["check"] = check.to_json()
        if not check.ok:
            rec.update(status="refused", reason=check.reason)
            continue
        runs[name] = pass_runner(fn, inp, pass_name)
    label = f"block {block.index} B={batch} {pass_name}"
    timings = time_interleaved(runs, min_run_time, threads, rounds, label)
    stock_s = timings["stock"]["median_s"] if "stock" in timings else None
    for name, t in timings.items():
        rec = records[name]
        rec.update(t)
        s = t["median_s"]
        rec["speedup_vs_stock"] = (stock_s / s) if stock_s else None
        rec["gflops"] = flops / s / 1e9
        rec["gbps"] = nbytes / s / 1e9
        if peaks:
            rec["frac_peak_flops"] = rec["gflops"] / peaks["sgemm"]["gflops"]
            rec["frac_peak_bw"] = rec["gbps"] / peaks["copy"]["gbps"]
    del inp, expected, runs
    return [records[n] for n in order]


# ----------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------


def bench_model(device: torch.device, threads: int, quick: bool, min_run_time: float) -> dict:
    """Training step and epoch of FashionCNN, fused vs stock, same initial
    weights, same synthetic data, interleaved."""
    from .model import FashionCNN

    batch = 256 if quick else MODEL_BATCH
    steps = 3 if quick else MODEL_EPOCH_STEPS
    epoch_reps = 1 if quick else 3
    gen = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (steps, batch, 1, 28, 28), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, 10, (steps, batch), generator=gen).to(device)

    torch.manual_seed(0)
    models = {"stock": FashionCNN("stock").to(device), "fused": FashionCNN("fused").to(device)}
    models["fused"].load_state_dict(models["stock"].state_dict())
    result: dict[str, Any] = {
        "data": "synthetic uint8 images (uniform 0..255) and labels, normalised on the fly",
        "batch": batch,
        "epoch_steps": steps,
        "epoch_reps": epoch_reps,
        "optimizer": f"Adam(lr={MODEL_LR})",
        "impls": {},
    }

    def batch_at(i: int):
        x = images[i].float().div_(255).sub_(FMNIST_MEAN).div_(FMNIST_STD)
        return x, labels[i]

    # Correctness gate: loss and every parameter gradient from the same state.
    x0, y0 = batch_at(0)
    grads = {}
    losses = {}
    for name, model in models.items():
        model.train()
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x0), y0)
        loss.backward()
        losses[name] = loss.detach().reshape(1)
        grads[name] = [p.grad.detach().clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    pnames = [n for n, _ in models["stock"].named_parameters()]
    check = compare_results(
        [losses["fused"], *grads["fused"]], [losses["stock"], *grads["stock"]], ["loss", *[f"grad {n}" for n in pnames]]
    )
    # Restore identical state (the gate ran BatchNorm in train mode).
    models["fused"].load_state_dict(models["stock"].state_dict())

    opts = {n: torch.optim.Adam(m.parameters(), lr=MODEL_LR) for n, m in models.items()}

    def make_step(name: str):
        model, opt = models[name], opts[name]
        counter = [0]

        def step(i: int | None = None):
            k = counter[0] % steps if i is None else i
            counter[0] += 1
            x, y = batch_at(k)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        return step

    step_fns = {n: make_step(n) for n in models}
    names = ["stock", "fused"] if check.ok else ["stock"]
    result["impls"]["stock"] = {"status": "ok", "reason": None, "check": None}
    result["impls"]["fused"] = {
        "status": "ok" if check.ok else "refused",
        "reason": check.reason,
        "check": check.to_json(),
    }
    result["fused_backend"] = "compiled" if _fused_compiled(device) else "reference fallback"

    step_t = time_interleaved({n: step_fns[n] for n in names}, min_run_time, threads, label="train step")
    for n in names:
        result["impls"][n]["step"] = step_t[n]

    epoch_times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(epoch_reps):
        for n in names if r % 2 == 0 else list(reversed(names)):
            _sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                step_fns[n](i)
            _sync(device)
            epoch_times[n].append(time.perf_counter() - t0)
    for n in names:
        result["impls"][n]["epoch"] = {
            "median_s": statistics.median(epoch_times[n]),
            "times_s": epoch_times[n],
        }
    if check.ok:
        for what in ("step", "epoch"):
            result[f"{what}_speedup_fused_vs_stock"] = (
                result["impls"]["stock"][what]["median_s"] / result["impls"]["fused"][what]["median_s"]
            )
    return result


# ----------------------------------------------------------------------------
# Machine description
# ----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_description(repo_dir: Path | None) -> dict:
    candidates = [p for p in (repo_dir, Path.cwd(), Path(__file__).resolve().parent) if p is not None]
    for d in candidates:
        commit = _git(["rev-parse", "HEAD"], d)
        if commit:
            status = _git(["status", "--porcelain", "--untracked-files=no"], d)
            return {"commit": commit, "dirty": bool(status), "dir": str(d)}
    return {"commit": None, "dirty": None, "dir": None}


def _fused_compiled(device: torch.device) -> bool:
    import fmnist_ext

    return fmnist_ext.uses_compiled_kernels(device)


def machine_description(device: torch.device, threads: int, repo_dir: Path | None) -> dict:
    import fmnist_ext

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    desc = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "loadavg_at_start": _loadavg(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "fmnist_ext": fmnist_ext.__version__,
        "kernels_status": fmnist_ext.kernels_status(),
        "fused_uses_compiled_kernels": fmnist_ext.uses_compiled_kernels(device),
        "git": git_description(repo_dir),
        "env": {
            k: os.environ[k]
            for k in (
                "MALLOC_MMAP_THRESHOLD_",
                "MALLOC_TRIM_THRESHOLD_",
                "FMNIST_CPU_ISA",
                "FMNIST_DISABLE_EXTENSION",
                "OMP_NUM_THREADS",
                "MKL_NUM_THREADS",
            )
            if k in os.environ
        },
    }
    if device.type == "cuda":
        desc["cudnn_version"] = torch.backends.cudnn.version()
        desc["allow_tf32"] = {
            "cudnn": torch.backends.cudnn.allow_tf32,
            "matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    return desc


# ----------------------------------------------------------------------------
# Output: markdown, JSON, PNG
# ----------------------------------------------------------------------------


def _fmt_ms(s: float | None) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _sig(v: float | None, suffix: str = "") -> str:
    """Compact, no exponent: 1234, 12.3, 1.23, 0.012."""
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}{suffix}"
    if v >= 1:
        return f"{v:.2f}{suffix}" if v < 10 else f"{v:.1f}{suffix}"
    return f"{v:.2g}{suffix}" if v > 0 else f"0{suffix}"


def render_markdown(report: dict) -> str:
    m = report["machine"]
    cfg = report["config"]
    ks = m["kernels_status"]
    lines = ["# fmnist_ext benchmark", ""]
    gpu = f", {m['cuda_device']}" if m.get("cuda_device") else ""
    git = m["git"]
    commit = (git["commit"][:12] + (" (dirty)" if git["dirty"] else "")) if git["commit"] else "unknown"
    lines.append(
        f"{m['date']} | {m['cpu_model']} ({m['cpu_affinity'] or m['cpu_count']} usable cores{gpu}) | "
        f"device {cfg['device']}, {cfg['threads']} threads | torch {m['torch']} | "
        f"fused: {'compiled' if m['fused_uses_compiled_kernels'] else 'REFERENCE FALLBACK'}"
        f"{' (' + ks['cpu_isa'] + ')' if cfg['device'] == 'cpu' and ks.get('cpu_isa') else ''} | commit {commit}"
        f"{' | QUICK run' if cfg['quick'] else ''}"
    )
    if not m["fused_uses_compiled_kernels"]:
        lines += [
            "",
            f"**Warning: the fused op runs the pure-PyTorch reference ({ks.get('not_loaded_reason') or 'no compiled kernel for this device'}).**",
        ]
    p = report["peaks"]
    lines += [
        "",
        f"Machine ceilings (measured now): sgemm {p['sgemm']['n']}^3 **{p['sgemm']['gflops']:.1f} GFLOP/s**; "
        f"copy {p['copy']['bytes'] / 2 / (1 << 20):.0f} MiB **{p['copy']['gbps']:.1f} GB/s** (read+write).",
        "",
        "Times are medians (ms); `vs stock` = stock time / this time in the same row (>1 is faster). "
        "GFLOP/s counts 2*Cout*Hconv*Wconv*Cin*k*k per image for the forward, the same again for the weight "
        "gradient and again for the input gradient; GB/s counts minimal bytes (see JSON `config`).",
    ]
    by_block: dict[int, list[dict]] = {}
    for r in report["rows"]:
        by_block.setdefault(r["block"], []).append(r)
    for bi, rows in by_block.items():
        lines += ["", f"## {BLOCKS[bi].describe()}", ""]
        lines.append("| batch | pass | impl | median ms | vs stock | GFLOP/s | % sgemm | GB/s | % copy |")
        lines.append("|---:|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if r["status"] != "ok":
                label = "REFUSED" if r["status"] == "refused" else "skipped"
                lines.append(f"| {r['batch']} | {r['pass']} | {r['impl']} | {label}: {r['reason']} | | | | | |")
                continue
            fpf, fpb = r.get("frac_peak_flops"), r.get("frac_peak_bw")
            lines.append(
                f"| {r['batch']} | {r['pass']} | {r['impl']} | {_fmt_ms(r['median_s'])} | "
                f"{_sig(r.get('speedup_vs_stock'), 'x')} | {_sig(r['gflops'])} | "
                f"{_sig(None if fpf is None else 100 * fpf)} | {_sig(r['gbps'])} | "
                f"{_sig(None if fpb is None else 100 * fpb)} |"
            )
    comp = [r for r in report["rows"] if r["impl"] == "compile" and r.get("compile_s") is not None]
    if comp:
        ci = report["config"].get("compile_info") or {}
        init = f" One-time start-up before the first row: {ci['init_s']:.1f} s." if ci.get("init_s") is not None else ""
        lines += [
            "",
            "## torch.compile: compile time (first call of the row, seconds)",
            "",
            f"Cold compiles (fresh inductor cache dir, graph caches off).{init}",
            "",
        ]
        lines.append("| block | batch | pass | compile s |")
        lines.append("|---:|---:|---|---:|")
        for r in comp:
            lines.append(f"| {r['block']} | {r['batch']} | {r['pass']} | {r['compile_s']:.2f} |")
    skipped = {r["reason"] for r in report["rows"] if r["impl"] == "compile" and r["status"] == "skipped"}
    if skipped:
        lines += ["", "torch.compile skipped: " + "; ".join(sorted(skipped))]
    mod = report.get("model")
    if mod:
        lines += ["", "## Whole model (FashionCNN, Adam lr 0.01, synthetic data)", ""]
        if mod.get("skipped"):
            lines.append(f"skipped: {mod['skipped']}")
        else:
            lines.append("| what | stock | fused | fused vs stock |")
            lines.append("|---|---:|---:|---:|")
            f = mod["impls"]["fused"]
            s = mod["impls"]["stock"]
            if f["status"] != "ok":
                lines.append(f"| training step | {_fmt_ms(s['step']['median_s'])} ms | REFUSED: {f['reason']} | |")
            else:
                lines.append(
                    f"| training step, batch {mod['batch']} | {_fmt_ms(s['step']['median_s'])} ms | "
                    f"{_fmt_ms(f['step']['median_s'])} ms | {mod['step_speedup_fused_vs_stock']:.2f}x |"
                )
                lines.append(
                    f"| epoch, {mod['epoch_steps']} steps x {mod['batch']} (median of {mod['epoch_reps']}) | "
                    f"{s['epoch']['median_s']:.2f} s | {f['epoch']['median_s']:.2f} s | "
                    f"{mod['epoch_speedup_fused_vs_stock']:.2f}x |"
                )
    if report.get("whole_model"):
        from . import bench_model as section

        lines += ["", section.render(report["whole_model"]).rstrip("\n")]
    lines += ["", f"Total benchmark time: {report['duration_s']:.0f} s"]
    return "\n".join(lines) + "\n"


def render_png(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    blocks = sorted({r["block"] for r in rows})
    impls = [i for i in report["config"]["impls"] if i != "stock"]
    batches = report["config"]["batch_sizes"]
    passes = list(PASSES)
    colors = {"fwd": "#4C72B0", "fwd+bwd": "#DD8452", "fwd+bwd+dx": "#55A868"}
    nr, nc = max(len(impls), 1), max(len(blocks), 1)
    fig, axes = plt.subplots(nr, nc, figsize=(6.5 * nc, 3.4 * nr + 0.8), squeeze=False)
    width = 0.8 / len(passes)
    index = {(r["block"], r["batch"], r["pass"], r["impl"]): r for r in rows}
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def fmt_x(v: float) -> str:
        return f"{v:.2f}" if v < 10 else f"{v:.0f}"

    for i, impl in enumerate(impls):
        for j, bi in enumerate(blocks):
            ax = axes[i][j]
            shown: list[float] = []
            for k, ps in enumerate(passes):
                xs, ys = [], []
                for bx, batch in enumerate(batches):
                    r = index.get((bi, batch, ps, impl))
                    x = bx + (k - (len(passes) - 1) / 2) * width
                    if r is None:
                        continue
                    if r["status"] != "ok" or not r.get("speedup_vs_stock"):
                        ax.text(
                            x,
                            1.0,
                            "REFUSED" if r["status"] == "refused" else "n/a",
                            rotation=90,
                            ha="center",
                            va="bottom",
                            fontsize=7,
                            color="red",
                        )
                        continue
                    xs.append(x)
                    ys.append(r["speedup_vs_stock"])
                shown += ys
                bars = ax.bar(xs, ys, width, label=ps, color=colors[ps])
                for rect, v in zip(bars, ys):
                    ax.text(
                        rect.get_x() + rect.get_width() / 2,
                        v,
                        fmt_x(v),
                        ha="center",
                        va="bottom" if v >= 1 else "top",
                        fontsize=7,
                    )
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_yscale("log")
            lo = min([0.5, *shown]) / 1.6
            hi = max([2.0, *shown]) * 1.8
            ax.set_ylim(lo, hi)
            mantissas = (1, 2, 5) if hi / lo < 300 else (1,)
            ticks = [m * 10.0**e for e in range(-3, 6) for m in mantissas if lo <= m * 10.0**e <= hi]
            ax.set_yticks(ticks)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(range(len(batches)))
            ax.set_xticklabels([str(b) for b in batches])
            ax.set_xlabel("batch size")
            ax.set_ylabel("speedup over stock (x, log)")
            ax.set_title(f"{impl}: {BLOCKS[bi].describe()}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[ps]) for ps in passes]
    fig.legend(
        handles, [f"{ps}: {PASS_DOC[ps]}" for ps in passes], loc="lower center", ncol=1, fontsize=8, frameon=False
    )
    m = report["machine"]
    fig.suptitle(
        f"fmnist_ext speedup over stock eager - {report['config']['device']}, {report['config']['threads']} threads, "
        f"torch {m['torch']}{' (QUICK run)' if report['config']['quick'] else ''}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.1 if nr == 1 else 0.06, 1, 0.97))
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _impl_list(text: str) -> list[str]:
    vals = [t.strip() for t in text.split(",") if t.strip()]
    bad = [v for v in vals if v not in IMPLS]
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
    lost; --device cuda needs a CUDA device. (The numbers are checked by their argparse types.)"""
    seen: dict[Path, str] = {}
    try:
        for name in OUTPUTS:
            path = getattr(args, name)
            if path is None:
                continue
            if name == "png":
                outputs.check_figure_format(path, "--png")
            outputs.check_writable(path, f"--{name}")
            key = path.resolve()
            if key in seen:
                raise outputs.OutputError(f"argument --{name}: {path} is also the {seen[key]} file")
            seen[key] = f"--{name}"
    except outputs.OutputError as e:
        cli.fail(parser, str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        cli.fail(parser, "argument --device: cuda requested but torch sees no CUDA device")


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
        description="Time the fused Conv2d+ReLU+MaxPool2d op against stock PyTorch, torch.compile and the "
        "pure-PyTorch fallback, per conv block and batch size, plus the whole model's training step and epoch.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--threads", type=cli.positive_int, default=None, help="torch threads for CPU (default: torch's default)"
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
    p.add_argument("--no-model", action="store_true", help="skip the whole-model training step / epoch")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch 1,64, no compile, short timings, tiny model section (explicit flags win)",
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
        type=cli.positive_float,
        default=None,
        help="seconds of measurement per implementation and row, split over the interleaving rounds "
        "(default 1.0; 0.05 with --quick)",
    )
    return p


def _bench_rows(blocks, batch_sizes, impl_fns, device, threads, min_run_time, peaks, compile_state, rows, log):
    for bi in blocks:
        for batch in batch_sizes:
            for ps in PASSES:
                t0 = time.perf_counter()
                recs = bench_row(BLOCKS[bi], batch, ps, impl_fns, device, threads, min_run_time, peaks, compile_state)
                rows.extend(recs)
                summary = ", ".join(
                    f"{r['impl']} {_fmt_ms(r.get('median_s'))} ms"
                    if r["status"] == "ok"
                    else f"{r['impl']} {r['status'].upper()}"
                    for r in recs
                )
                log(f"  block {bi} B={batch} {ps}: {summary} ({time.perf_counter() - t0:.1f} s)")


def run(args: argparse.Namespace, repo_dir: Path | None = None, log=None) -> dict:
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
    impls = args.impls or list(QUICK_IMPLS if quick else IMPLS)
    if "stock" not in impls:
        impls = ["stock", *impls]
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.05 if quick else 1.0)
    torch.manual_seed(0)

    config = {
        "device": device.type,
        "threads": threads,
        "batch_sizes": batch_sizes,
        "blocks": blocks,
        "impls": impls,
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
        f"fmnist-benchmark: {device.type}, {threads} threads, batch sizes {batch_sizes}, impls {impls}"
        f"{', quick' if quick else ''}"
    )
    log("measuring machine ceilings (sgemm, copy) ...")
    peaks = measure_peaks(device, threads, quick)

    impl_fns: dict[str, Impl | None] = {}
    base = base_impls()
    for name in impls:
        impl_fns[name] = None if name == "compile" else base[name]
    compile_state = CompileState()
    compile_info = None
    if "compile" in impls:
        compile_info = _prepare_compile(device, compile_state)
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
        _bench_rows(blocks, batch_sizes, impl_fns, device, threads, min_run_time, peaks, compile_state, rows, log)
    finally:
        if compile_info and compile_info.get("fresh_cache_dir"):
            _restore_compile_cache_dir(compile_info)
    if compile_info is not None:
        config["compile_info"] = {k: v for k, v in compile_info.items() if not k.startswith("_")}
    model = None
    if not args.no_model:
        log("whole model: training step and epoch ...")
        try:
            model = bench_model(device, threads, quick, min_run_time)
        except Exception as exc:
            traceback.print_exc()
            model = {"skipped": f"{type(exc).__name__}: {_first_line(exc)}"}
    whole_model = None
    if not args.no_model and not quick and device.type == "cpu":
        from . import bench_model as section  # the whole-model section: one process per implementation

        log("whole model, one process per implementation (python -m fmnist_ext.bench_model) ...")
        whole_model = section.run_section(threads=threads, log=log)
    report = {
        "schema": SCHEMA,
        "config": config,
        "machine": machine,
        "peaks": peaks,
        "rows": rows,
        "model": model,
        "whole_model": whole_model,
        "duration_s": time.perf_counter() - t_start,
    }
    machine["loadavg_at_end"] = _loadavg()
    return report


@clirun.guarded("fmnist_ext.benchmark", name="fmnist-benchmark")  # the name its errors use
def main(argv: list[str] | None = None, repo_dir: Path | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.refuse_bad_cpu_isa(parser)
    check_arguments(parser, args)
    report = run(args, repo_dir)
    md = render_markdown(report)
    # Files before stdout: `... | head` closing the pipe must not lose them.
    errors = write_outputs(args, report, md)
    for line in errors:
        print(line, file=sys.stderr)
    sys.stdout.write(md)
    sys.stdout.flush()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
