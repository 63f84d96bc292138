"""The machine's ceilings on the benchmarked device, measured in the same run.

A large float32 matmul (GFLOP/s) and a large copy (GB/s): the per-row
"% sgemm" and "% copy" columns are fractions of these.
"""

from __future__ import annotations

import torch

from .timing import timer


def _sgemm_s(device: torch.device, n: int, threads: int, min_run: float) -> float:
    """Median time of one n x n float32 matmul (the operands are freed on return)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    return timer(lambda: torch.mm(a, b, out=c), "sgemm", threads).blocked_autorange(min_run_time=min_run).median


def _copy_s(device: torch.device, numel: int, threads: int, min_run: float) -> float:
    """Median time of copying `numel` float32 values (the buffers are freed on return)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src), "copy", threads).blocked_autorange(min_run_time=min_run).median


def measure_peaks(device: torch.device, threads: int, quick: bool) -> dict:
    """A large float32 matmul (GFLOP/s) and a large copy (GB/s) on `device`.

    Copy bandwidth counts the bytes read plus the bytes written."""
    n = 1024 if quick else 4096
    copy_mb = 64 if quick else 256
    min_run = 0.2 if quick else 1.0
    sgemm_s = _sgemm_s(device, n, threads, min_run)
    numel = copy_mb * (1 << 20) // 4
    copy_s = _copy_s(device, numel, threads, min_run)
    nbytes = numel * 4
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
