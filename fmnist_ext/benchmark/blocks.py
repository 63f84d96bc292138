"""The per-block rows: the seed CNN's two conv blocks, each pass and batch size,
every implementation checked against stock on the timed inputs, then timed
interleaved with stock in one process.

FLOPs per image (the dense work stock does; an implementation that skips work,
like the fused backward visiting only pool winners, gets the same credit, so its
GFLOP/s is an effective rate): forward F = 2*Cout*Hconv*Wconv*Cin*k*k (Hconv,
Wconv: the un-pooled conv output; bias, ReLU, pooling not counted), weight grad
~F, input grad ~F; fwd = F, fwd+bwd = 2F, fwd+bwd+dx = 3F. Bytes: the minimal
traffic of separate ops: the forward reads input, weight, bias and writes the
pooled output; the backward reads grad_output, input, weight and writes
grad_weight, grad_bias (and grad_input for fwd+bwd+dx).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .measure import MEAN, STD, clock, compare, first_line, time_interleaved

PASSES = {
    "fwd": "forward under torch.no_grad()",
    "fwd+bwd": "forward + backward for weight and bias (input.requires_grad=False)",
    "fwd+bwd+dx": "forward + backward for input, weight and bias",
}
RESULTS = {"fwd": ("output",), "fwd+bwd": ("output", "grad_weight", "grad_bias")}
RESULTS["fwd+bwd+dx"] = ("output", "grad_input", "grad_weight", "grad_bias")
ROUNDS = 3  # interleaving rounds per row


@dataclass(frozen=True)
class Block:
    index: int
    cin: int
    cout: int
    hw: int  # input height = width; kernel 5, pool 2, no padding
    k: int = 5

    @property
    def conv_hw(self) -> int:
        return self.hw - self.k + 1

    def describe(self) -> str:
        return (
            f"block {self.index}: [B,{self.cin},{self.hw},{self.hw}], conv {self.cin}->{self.cout} 5x5, relu, maxpool 2"
        )

    def flops(self, batch: int, pass_name: str) -> int:
        fwd = 2 * self.cout * self.conv_hw**2 * self.cin * self.k**2 * batch
        return fwd * (1 + list(PASSES).index(pass_name))

    def bytes_moved(self, batch: int, pass_name: str) -> int:
        x, w, b = batch * self.cin * self.hw**2, self.cout * self.cin * self.k**2, self.cout
        y = batch * self.cout * (self.conv_hw // 2) ** 2
        n = x + w + b + y  # forward
        if pass_name != "fwd":
            n += y + x + w + w + b  # backward: read g, x, w; write dw, db
        return 4 * (n + (x if pass_name == "fwd+bwd+dx" else 0))  # + write dx


BLOCKS = {1: Block(1, cin=1, cout=6, hw=28), 2: Block(2, cin=6, cout=12, hw=12)}


def stock_block(x, w, b):
    """The stock eager sequence (also what fmnist_ext's pure-PyTorch fallback computes)."""
    return F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2, 2)


def fused_block(x, w, b):
    import fmnist_ext

    return fmnist_ext.conv_relu_maxpool2d(x, w, b, padding=0, pool=2)


def compiled_stock(inputs: dict, pass_name: str):
    """torch.compile of the stock sequence, one static graph per row (dynamo reset);
    the first call, timed, compiles it."""
    torch.compiler.reset()
    fn = torch.compile(stock_block, dynamic=False)
    t0 = clock(inputs["x"].device)
    runner(fn, inputs, pass_name)()
    return fn, clock(inputs["x"].device) - t0


# The implementations a row compares: name -> (inputs, pass) -> (callable (x, w, b), seconds spent
# building it, or None). Adding an implementation is one entry here; stock is every ratio's baseline.
IMPLS = {
    "stock": lambda inputs, pass_name: (stock_block, None),
    "fused": lambda inputs, pass_name: (fused_block, None),
    "compile": compiled_stock,
}


def make_inputs(block: Block, batch: int, device: torch.device) -> dict:
    """Inputs like the model's: block 1 normalised uint8-like images, block 2
    standard-normal activations; nn.Conv2d's default weight and bias init; a fixed
    random grad_output. Block 2's activations, weights and bias are rounded to
    multiples of 2^-6, 2^-10, 2^-16 (< 1% of their spread) so every product and sum
    of its convolution is exact in float32: fused, stock and the float64 yardstick
    then see the same pool winners (with near-ties at batch 1000, each float32
    summation order has its own, equally right, winner, and the gate would refuse a
    correct backward)."""
    gen = torch.Generator().manual_seed(block.index * 31 + batch)
    shape = (batch, block.cin, block.hw, block.hw)
    bound = 1 / math.sqrt(block.cin * block.k**2)  # kaiming_uniform(a=sqrt(5))
    if block.index == 1:
        x = torch.randint(0, 256, shape, generator=gen).float().div_(255).sub_(MEAN).div_(STD)
    else:
        x = _round(torch.randn(shape, generator=gen).clamp_(-7, 7), 6)
    w = (torch.rand((block.cout, block.cin, block.k, block.k), generator=gen) * 2 - 1) * bound
    b = (torch.rand((block.cout,), generator=gen) * 2 - 1) * bound
    if block.index == 2:
        w, b = _round(w, 10), _round(b, 16)
    g = torch.randn((batch, block.cout, block.conv_hw // 2, block.conv_hw // 2), generator=gen)
    return {k: t.to(device).contiguous() for k, t in zip("xwbg", (x, w, b, g))}


def _round(t: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.round(t * 2.0**bits) / 2.0**bits


def runner(fn, inputs: dict, pass_name: str):
    """A no-argument callable doing one pass of `fn`, returning the output and
    the gradients (torch.autograd.grad with the fixed grad_output)."""
    x, w, b, g = (inputs[k].detach() for k in "xwbg")
    if pass_name == "fwd":

        def fwd():
            with torch.no_grad():
                return (fn(x, w, b),)

        return fwd
    w, b = w.requires_grad_(), b.requires_grad_()
    wrt = (x.requires_grad_(), w, b) if pass_name == "fwd+bwd+dx" else (w, b)

    def run():
        y = fn(x, w, b)
        return (y.detach(), *torch.autograd.grad(y, wrt, g))

    return run


def check(fn, inputs: dict, pass_name: str, want=None, exact=None) -> dict:
    """The gate: `fn`'s output (and gradients) against stock's on `inputs` (and, with
    `exact`, stock's float64 result; measure.compare). An exception is a failure."""
    want = want if want is not None else runner(stock_block, inputs, pass_name)()
    try:
        got = runner(fn, inputs, pass_name)()
    except Exception as exc:
        return {"ok": False, "reason": f"raised {first_line(exc)}", "max_rel_err": {}}
    return compare(got, want, RESULTS[pass_name], exact)


def bench_row(block, batch, pass_name, impls, device, threads, min_run_time, ceilings=None, failed=None) -> list[dict]:
    """One row: stock and each of `impls` checked against stock (and its float64
    result) on the same inputs, then the ones that pass timed interleaved. An
    implementation that failed to build is skipped, and stays skipped in later
    rows (`failed`: name -> reason). One record per implementation."""
    failed = {} if failed is None else failed
    inputs = make_inputs(block, batch, device)
    want = runner(stock_block, inputs, pass_name)()
    exact = runner(stock_block, {k: t.double() for k, t in inputs.items()}, pass_name)()
    flops, nbytes = block.flops(batch, pass_name), block.bytes_moved(batch, pass_name)
    records, runs, key = {}, {}, {"block": block.index, "batch": batch, "pass": pass_name}
    for name in ["stock", *(n for n in impls if n != "stock")]:
        rec = records[name] = {**key, "impl": name, "status": "ok", "reason": None, "flops": flops, "bytes": nbytes}
        if name not in failed:
            try:
                fn, rec["compile_s"] = IMPLS[name](inputs, pass_name)
            except Exception as exc:
                failed[name] = first_line(exc)
        if name in failed:
            rec.update(status="skipped", reason=f"could not be built: {failed[name]}")
            continue
        rec["check"] = check(fn, inputs, pass_name, want, exact)
        if not rec["check"]["ok"]:
            rec.update(status="refused", reason=rec["check"]["reason"])
            continue
        runs[name] = runner(fn, inputs, pass_name)
    timings = time_interleaved(runs, min_run_time, threads, ROUNDS)
    for name, t in timings.items():
        s = t["median_s"]
        rec = records[name]
        rec.update(t, speedup_vs_stock=timings["stock"]["median_s"] / s, gflops=flops / s / 1e9, gbps=nbytes / s / 1e9)
        if ceilings:
            rec["frac_sgemm"] = rec["gflops"] / ceilings["sgemm"]["gflops"]
            rec["frac_copy"] = rec["gbps"] / ceilings["copy"]["gbps"]
    return list(records.values())


def bench_rows(cfg: dict, device: torch.device, ceilings: dict, rows: list, log) -> float | None:
    """Every row of cfg's blocks x batch sizes x PASSES, appended to `rows` as it is
    measured, one progress line each. Returns the one-time torch.compile start-up
    (imports, toolchain checks: not charged to the first row), if compile is timed."""
    failed: dict[str, str] = {}  # an implementation that could not be built: skipped in every row
    startup_s = None
    if "compile" in cfg["impls"] and cfg["blocks"]:
        try:
            t0 = clock(device)
            torch.compile(lambda v: torch.relu(v * 2.0) + 1.0, dynamic=False)(torch.randn(8, device=device))
            startup_s = clock(device) - t0
        except Exception as exc:
            failed["compile"] = first_line(exc)
    for bi, batch, pass_name in itertools.product(cfg["blocks"], cfg["batch_sizes"], PASSES):
        t0 = time.perf_counter()
        args = (cfg["impls"], device, cfg["threads"], cfg["min_run_time_s"], ceilings, failed)
        rows += (recs := bench_row(BLOCKS[bi], batch, pass_name, *args))
        done = [
            f"{r['impl']} " + (f"{r['median_s'] * 1e3:.3g} ms" if r["status"] == "ok" else r["status"]) for r in recs
        ]
        log(f"  block {bi} B={batch} {pass_name}: {', '.join(done)} ({time.perf_counter() - t0:.1f} s)")
    return startup_s
