"""Helpers shared by the operator tests: the devices they run on, the compiled
kernels they need, the CPU kernel builds, test cases, the stock reference and
the tolerances.

Every op test takes a `device` parameter from `cpu_and_cuda()` (or
`cpu_isas_and_cuda()`, which runs the cpu case once per CPU kernel build), so
one test checks one behaviour on every device, and the first run on a GPU
machine exercises the whole op suite. The cuda case is skipped, with the
reason, where there is no CUDA device or no compiled CUDA kernels: the tests
never run the pure-PyTorch reference on cuda and call that a test of the
kernels.

An importable module rather than conftest.py, so tests import these names
explicitly; conftest.py holds only pytest hooks and fixtures.
"""

from __future__ import annotations

import os

import pytest
import torch

import fmnist_ext
from fmnist_ext.op import _library, reference

# ---------------------------------------------------------------------------
# Which kernels can run here


def supported_cpu_isas() -> list[str]:
    """Every CPU kernel build this machine can run (lowest first); [] without
    the compiled CPU kernels. Ignores a FMNIST_CPU_ISA set by the caller."""
    if "cpu" not in _library.COMPILED_DEVICE_TYPES:
        return []
    saved = os.environ.pop("FMNIST_CPU_ISA", None)
    try:
        best = _library.cpu_isa()
    finally:
        if saved is not None:
            os.environ["FMNIST_CPU_ISA"] = saved
    return list(_library.CPU_ISAS[: _library.CPU_ISAS.index(best) + 1])


def cuda_skip_reason() -> str | None:
    """Why the cuda case of a test cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if "cuda" not in _library.COMPILED_DEVICE_TYPES:
        if not _library.LOADED:
            return f"compiled library not loaded: {_library.NOT_LOADED_REASON}"
        return "fmnist_ext was built without CUDA kernels"
    return None


requires_compiled_cpu = pytest.mark.skipif(
    "cpu" not in _library.COMPILED_DEVICE_TYPES,
    reason=f"compiled CPU kernels not loaded: {_library.NOT_LOADED_REASON}",
)
requires_cuda_kernels = pytest.mark.skipif(cuda_skip_reason() is not None, reason=cuda_skip_reason() or "n/a")

# ---------------------------------------------------------------------------
# The `device` parameter


def _cuda_param():
    # The `cuda` mark selects the GPU cases (pytest -m cuda); registered in conftest.py.
    return pytest.param("cuda", marks=[requires_cuda_kernels, pytest.mark.cuda], id="cuda")


def cpu_and_cuda(compiled: bool = True) -> list:
    """Values for `@pytest.mark.parametrize("device", cpu_and_cuda())`.

    compiled=True (the default, for tests of the kernels): the cpu case needs
    the compiled CPU kernels (skipped with the reason without them; under
    FMNIST_REQUIRE_COMPILED=1 the session fails instead). compiled=False, for
    tests of the Python API that must also hold under the reference fallback:
    the cpu case always runs. The cuda case always needs the compiled CUDA
    kernels.
    """
    cpu = pytest.param("cpu", marks=[requires_compiled_cpu] if compiled else [], id="cpu")
    return [cpu, _cuda_param()]


def cpu_isas_and_cuda(compiled: bool = True) -> list:
    """Like cpu_and_cuda(), with the cpu case once per CPU kernel build this
    machine runs (ids cpu-default, cpu-avx2, ...). The `cpu_isa` mark on each
    makes conftest.py's fixture set FMNIST_CPU_ISA for that test only."""
    isas = supported_cpu_isas()
    if not isas:
        return cpu_and_cuda(compiled)
    cpu = [pytest.param("cpu", marks=[pytest.mark.cpu_isa(isa)], id=f"cpu-{isa}") for isa in isas]
    return [*cpu, _cuda_param()]


def cuda_only() -> list:
    """The cuda case alone, for a check that needs a second real device type
    beside the tensors' (on cpu the only other one, meta, runs the fake
    kernels instead of the compiled ones)."""
    return [_cuda_param()]


def other_device(device: str) -> str:
    """A device a tensor can be on that is not `device` (for mixed-device errors)."""
    return "meta" if device == "cpu" else "cpu"


# ---------------------------------------------------------------------------
# Cases and the stock reference

# Shapes of the forward/backward grid, as (n, cin, h, w, cout, kernel, padding, pool).
# The op and its backward op as torch.ops packets (None when the library did
# not load: the tests that call them are skipped then).
OP = torch.ops.fmnist_ext.conv_relu_maxpool2d if hasattr(torch.ops.fmnist_ext, "conv_relu_maxpool2d") else None
BWD = (
    torch.ops.fmnist_ext._conv_relu_maxpool2d_backward
    if hasattr(torch.ops.fmnist_ext, "_conv_relu_maxpool2d_backward")
    else None
)


GRID = [
    pytest.param(4, 1, 28, 28, 6, 5, 0, 2, id="seed-block1"),
    pytest.param(4, 6, 12, 12, 12, 5, 0, 2, id="seed-block2"),
    pytest.param(3, 2, 13, 11, 4, 3, 0, 2, id="odd-sizes-floor"),
    pytest.param(2, 3, 10, 10, 5, 3, (1, 2), 2, id="padding"),
    pytest.param(2, 2, 9, 12, 3, (2, 4), 0, 3, id="rect-kernel-pool3"),
    pytest.param(2, 2, 7, 7, 7, 1, 0, 1, id="pool1-1x1"),
    pytest.param(1, 1, 40, 40, 2, 3, 0, 16, id="pool16-int32-index"),
    pytest.param(2, 1, 16, 20, 3, (3, 11), 0, 2, id="wide-kernel"),
    pytest.param(1, 2, 20, 100, 13, 3, 1, 2, id="wide-image-13-channels"),
    pytest.param(1, 1, 28, 28, 6, 5, 0, 2, id="batch1"),
    pytest.param(0, 1, 28, 28, 6, 5, 0, 2, id="batch0"),
    pytest.param(2, 3, 5, 5, 2, 5, 0, 1, id="kernel-equals-input"),
    pytest.param(2, 2, 3, 3, 2, 5, 2, 3, id="kernel-larger-than-input-padded"),
    # The CUDA kernels' plans: batch slices and chunks, odd shapes, the direct
    # path (too big for shared memory), filter banks in channel groups.
    pytest.param(7, 1, 28, 28, 6, 5, 0, 2, id="seed-block1-batch7"),
    pytest.param(64, 1, 28, 28, 6, 5, 0, 2, id="seed-block1-batch64"),
    pytest.param(1, 6, 12, 12, 12, 5, 0, 2, id="seed-block2-batch1"),
    pytest.param(5, 6, 12, 12, 12, 5, 0, 2, id="seed-block2-batch5"),
    pytest.param(64, 6, 12, 12, 12, 5, 0, 2, id="seed-block2-batch64"),
    pytest.param(3, 3, 13, 11, 5, 3, 0, 2, id="odd-sizes-3x3"),
    pytest.param(2, 2, 9, 10, 4, 3, (1, 2), 2, id="padding-1-2"),
    pytest.param(2, 3, 10, 12, 7, (2, 5), (1, 0), 2, id="rect-kernel-padding-1-0"),
    pytest.param(2, 2, 11, 9, 3, (4, 2), (0, 1), 3, id="pool3-padding-0-1"),
    pytest.param(3, 4, 8, 8, 5, 3, 1, 1, id="pool1-3x3-padding"),
    # CPU row-pair tiles (6-channel blocks on AVX2) with an odd pool: a row
    # pair, then one row two vectors wide.
    pytest.param(2, 2, 14, 17, 6, 3, 0, 3, id="pool3-6-channels"),
    pytest.param(2, 2, 20, 19, 3, (3, 2), 1, 16, id="pool16-padding"),
    pytest.param(2, 16, 40, 40, 8, 3, 1, 2, id="direct-path-16-channels-40x40"),
    pytest.param(1, 64, 9, 9, 64, 3, 0, 2, id="channel-groups-64x64"),
]


def make_case(n, cin, h, w, cout, k, dtype=torch.float32, bias=True, requires_grad=True, device="cpu", exact=None):
    """Input, weight (scaled like nn.Conv2d's fan-in) and bias. Drawn on the
    CPU from torch's seeded generator and then moved, so every device gets
    the same numbers. exact (default: on a CUDA device) draws small dyadic
    numbers instead (exact_on_cuda says why); exact=False keeps random reals
    on every device, for numerical differentiation, which needs points away
    from ties."""
    kh, kw = (k, k) if isinstance(k, int) else k
    if exact is None:
        exact = torch.device(device).type == "cuda"
    if exact:
        x = dyadic((n, cin, h, w), dtype=dtype)
        wt = dyadic((cout, cin, kh, kw), dtype=dtype, scale=1 / 32)
        b = dyadic((cout,), dtype=dtype, scale=1 / 32) if bias else None
    else:
        x = torch.randn(n, cin, h, w, dtype=dtype)
        wt = torch.randn(cout, cin, kh, kw, dtype=dtype) / (cin * kh * kw) ** 0.5
        b = torch.randn(cout, dtype=dtype) * 0.1 if bias else None
    x, wt = x.to(device), wt.to(device)
    b = b.to(device) if b is not None else None
    if requires_grad:
        x.requires_grad_()
        wt.requires_grad_()
        if b is not None:
            b.requires_grad_()
    return x, wt, b


def pair(p):
    return (p, p) if isinstance(p, int) else tuple(p)


# ---------------------------------------------------------------------------
# Exact data, for comparisons whose two sides sum in different orders


def dyadic(shape, gen=None, dtype=torch.float32, low=-8, high=8, scale=0.25, device="cpu"):
    """Integers in [low, high] times `scale` (a power of two): products and sums
    of a few thousand such numbers are exact in float32 and float64, whatever
    the summation order, so two correct implementations agree bit for bit and
    equal values (ties between pool-window positions) are frequent."""
    return (torch.randint(low, high + 1, tuple(shape), generator=gen).to(dtype) * scale).to(device)


def _is_dyadic(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all()) and bool(((t.detach() * 128).frac() == 0).all()) and float(t.abs().max()) <= 8


def exact_on_cuda(x, w, b):
    """On a CUDA device, fill x, w and b (in place, keeping layout and
    requires_grad) with exact values unless they already hold some; a no-op
    elsewhere.

    Why: the stock sequence on a GPU (cuDNN) sums each window position in
    another order than the fused kernels. On random reals a window whose two
    largest values differ by less than float32 rounding then picks a different
    winner on each side and moves a whole gradient term: a false alarm on a
    correct kernel, likelier the larger the batch. On these values every sum
    is exact, both sides see the same values, ties and winners, and any
    difference is a bug. (The CPU cases keep random reals: both sides there
    are fixed code on a fixed machine, and they exercise the rounding.)"""
    if x.device.type != "cuda":
        return
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for t, scale in ((x, 0.25), (w, 1 / 32), (b, 1 / 32)):
            if t is not None and t.numel() and not _is_dyadic(t):
                t.copy_(dyadic(t.shape, gen, t.dtype, scale=scale))


def float64_stock_on_device(x, w, b, padding, pool, grad_out):
    """The stock sequence's output and gradients in float64 on x's device
    (without cuDNN, see stock): on exact data (exact_on_cuda) the result is exact."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b) if t is not None]
    with torch.backends.cudnn.flags(enabled=False):  # the backward's convolutions too
        y = stock(leaves[0], leaves[1], leaves[2] if b is not None else None, padding, pool)
        inputs = [t for t in leaves if t.requires_grad]
        grads = (
            torch.autograd.grad(y, inputs, grad_out.double(), allow_unused=True)
            if inputs and y.numel()
            else [torch.zeros_like(t) for t in inputs]
        )
    return y, grads


def forward_and_grads(fn, x, w, b, padding, pool, grad_out=None):
    """Output and (grad_input, grad_weight, grad_bias) of fn for a given grad_out."""
    y = fn(x, w, b, padding, pool)
    if grad_out is None:
        grad_out = torch.randn_like(y)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grads = (
        torch.autograd.grad(y, inputs, grad_out, allow_unused=True)
        if inputs and y.numel()
        else [torch.zeros_like(t) for t in inputs]
    )
    return y, grads, grad_out


def fused(x, w, b, padding, pool):
    return fmnist_ext.conv_relu_maxpool2d(x, w, b, padding, pool)


def stock(x, w, b, padding, pool):
    """The stock sequence conv2d -> relu -> max_pool2d (the op's definition),
    without cuDNN on a GPU: its Winograd and FFT algorithms transform the data
    and round even exact inputs, where PyTorch's own kernels (im2col + GEMM)
    keep exact data exact (exact_on_cuda)."""
    with torch.backends.cudnn.flags(enabled=False):
        return reference.conv_relu_maxpool2d(x, w, b, pair(padding), pool)


def tolerances(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


# grad_weight and grad_bias are float32 sums over every pooled output of the
# batch (n * ph * pw terms), and an element where those terms cancel keeps the
# rounding error of the large ones. Up to 576 terms (seed block 1 at batch 4,
# the largest case of the original CPU grid) the plain tolerance holds. Beyond
# (the larger batches of the CUDA grid), atol is 1e-6 of the tensor's largest
# magnitude when that is more (about 8 float32 epsilons; measured on the CPU:
# at most 3.2e-7 of it), rtol unchanged.
BASE_REDUCTION_TERMS = 576
REDUCTION_ATOL_OF_MAX = 1e-6


def assert_matches_stock(x, w, b, padding, pool, dtype, large_batch_rule=False):
    """The fused op's output and every gradient equal stock's (to rounding);
    returns the output. large_batch_rule: the float32 reductions of a case
    over BASE_REDUCTION_TERMS get the tolerance described above.

    On a CUDA device the data are made exact (exact_on_cuda says why) and the
    fused results must equal the float64 stock sequence exactly."""
    if x.device.type == "cuda":
        exact_on_cuda(x, w, b)
        gen = torch.Generator().manual_seed(4321)
        y = fused(x, w, b, padding, pool)
        g = dyadic(y.shape, gen, y.dtype, low=-4, high=4, device=y.device)
        y, grads, _ = forward_and_grads(fused, x, w, b, padding, pool, g)
        y_ref, grads_ref = float64_stock_on_device(x, w, b, padding, pool, g)
        for got, want in zip((y, *grads), (y_ref, *grads_ref)):
            torch.testing.assert_close(got.double(), want, rtol=0, atol=0, equal_nan=True)
        return y
    y, grads, g = forward_and_grads(fused, x, w, b, padding, pool)
    y_ref, grads_ref, _ = forward_and_grads(stock, x, w, b, padding, pool, g)
    tol = tolerances(dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    terms = y.shape[0] * y.shape[2] * y.shape[3]
    for got, want, t in zip(grads, grads_ref, [t for t in (x, w, b) if t is not None and t.requires_grad]):
        if not large_batch_rule or t is x or dtype != torch.float32 or terms <= BASE_REDUCTION_TERMS:
            torch.testing.assert_close(got, want, **tol)
        else:
            atol = max(tol["atol"], REDUCTION_ATOL_OF_MAX * float(want.abs().max()))
            torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=atol)
    return y
