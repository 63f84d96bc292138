"""The stock sequence (cuDNN conv2d + relu + max_pool2d with indices, forward
and backward) estimated with h200.py's model from each kernel's minimum
memory traffic and FMAs at the same shapes: every tensor a kernel must read
or write crosses DRAM once, nothing more (so stock is never overestimated).
"""

from __future__ import annotations

from h200 import stock_kernel_time
from shapes import Block


def stock_kernels(b: Block) -> list[tuple[str, str, int, int]]:
    """(direction, kernel, bytes, fmas) of the stock sequence for block b."""
    x, w, c, p, i = b.x_bytes(), b.w_bytes(), b.conv_bytes(), b.pooled_bytes(), b.index_bytes()
    rows = [
        ("fwd", "conv (cuDNN, bias fused)", x + w + c, b.conv_fmas()),
        ("fwd", "relu (in place)", 2 * c, 0),
        ("fwd", "max_pool2d_with_indices", c + p + i, 0),
        ("bwd", "max_pool2d backward (zero + scatter)", c + p + i, 0),
        ("bwd", "threshold_backward (relu)", 3 * c, 0),
    ]
    if b.grad_input:
        rows.append(("bwd", "conv dgrad (cuDNN)", c + w + x, b.conv_fmas()))
    rows.append(("bwd", "conv wgrad (cuDNN)", c + x + w, b.conv_fmas()))
    rows.append(("bwd", "bias grad (reduction)", c, 0))
    return rows


def stock_rows(b: Block) -> list[dict]:
    out = []
    for direction, kernel, nbytes, fmas in stock_kernels(b):
        t = stock_kernel_time(nbytes, fmas)
        out.append({"block": b.name, "dir": direction, "kernel": kernel, "bytes": nbytes, "fmas": fmas, **t})
    return out
