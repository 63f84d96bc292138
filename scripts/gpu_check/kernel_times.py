"""Per-kernel device times of both model blocks, fused against stock (cuDNN),
from torch.profiler: the forward alone, then forward + backward with
training's output masks (block 1: no grad_input), at each batch size. Every
kernel's time is its device time summed over ITERS iterations, divided by
ITERS; TF32 off, cudnn.benchmark off (the defaults training runs with,
TF32 aside). Writes a table to stdout and the rows to --json.

    python scripts/gpu_check/kernel_times.py [--batches 1000,10000] [--json FILE] [--device cuda]

For the estimates of the CUDA cost counter (scripts/cuda_cost.py) to be calibrated
against: the names are the kernels' own (conv_relu_maxpool2d_*).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import fmnist_ext
from fmnist_ext.op import reference

ITERS, WARMUP = 20, 5
BLOCKS = {1: ((1, 28, 28), (6, 1, 5, 5), False), 2: ((6, 12, 12), (12, 6, 5, 5), True)}


def _step(impl, x, w, b, g, backward: bool):
    fn = fmnist_ext.conv_relu_maxpool2d if impl == "fused" else reference.conv_relu_maxpool2d
    y = fn(x, w, b, (0, 0), 2)
    if backward:
        torch.autograd.grad(y, [t for t in (x, w, b) if t.requires_grad], g)


def _device_us(event) -> float:
    for name in ("device_time_total", "cuda_time_total", "self_device_time_total"):
        v = getattr(event, name, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_case(block: int, batch: int, impl: str, backward: bool, device) -> list[dict]:
    xs, ws, grad_input = BLOCKS[block]
    gen = torch.Generator().manual_seed(block)
    x = torch.randint(-8, 9, (batch, *xs), generator=gen).float().div(4).to(device).requires_grad_(grad_input)
    w = torch.randint(-8, 9, ws, generator=gen).float().div(32).to(device).requires_grad_()
    b = torch.randint(-8, 9, (ws[0],), generator=gen).float().div(32).to(device).requires_grad_()
    g = torch.randint(-4, 5, (batch, ws[0], (xs[1] - 4) // 2, (xs[2] - 4) // 2), generator=gen).float().div(4)
    g = g.to(device)
    for _ in range(WARMUP):
        _step(impl, x, w, b, g, backward)
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(ITERS):
            _step(impl, x, w, b, g, backward)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    phase = "fwd+bwd" if backward else "fwd"
    rows = []
    for e in prof.key_averages():
        if device.type == "cuda":  # the device's own events (kernels, memsets, copies), not the host ops
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = _device_us(e)
        else:  # a dry run: the host ops' own times
            us = float(e.self_cpu_time_total)
        if us <= 0:
            continue
        rows.append(
            dict(
                block=block,
                batch=batch,
                impl=impl,
                phase=phase,
                kernel=e.key,
                calls_per_iter=e.count / ITERS,
                us_per_iter=us / ITERS,
            )
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1000,10000", help="comma-separated batch sizes (default 1000,10000)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the script")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for batch in (int(s) for s in args.batches.split(",")):
        for block in BLOCKS:
            for backward in (False, True):
                for impl in ("fused", "stock"):
                    case = profile_case(block, batch, impl, backward, device)
                    rows += case
                    total = sum(r["us_per_iter"] for r in case)
                    print(
                        f"block {block} batch {batch:>6} {'fwd+bwd' if backward else 'fwd':>7} {impl:5}: {total:9.1f} us"
                    )
                    for r in sorted(case, key=lambda r: -r["us_per_iter"]):
                        print(f"    {r['us_per_iter']:9.1f} us  x{r['calls_per_iter']:.0f}  {r['kernel'][:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "iters": ITERS, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
