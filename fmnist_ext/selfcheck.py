"""A short battery of the fused operator against the stock sequence, per device.

`python -m fmnist_ext.info --check` runs the full battery on every device it
can see; `python -m fmnist_ext.train` with fused kernels on a CUDA device runs
the quick form once before training and refuses to start on a mismatch (a
kernel that is wrong on this GPU must not silently train a bad model).

Every case compares the output and all three gradients (input, weight, bias)
of `fmnist_ext.conv_relu_maxpool2d` with `max_pool2d(relu(conv2d))` computed
in float64 on the same device. Errors are relative to the magnitude of the
reference tensor (max |got - want| / max |want|), so they do not grow with the
batch.

The data are small dyadic numbers (multiples of 1/4 and 1/32 in a small
range): every product and sum the kernels form is exact in float32, whatever
the summation order. So float32 and float64 see the same convolution values,
the same ties and the same winners; with random reals a window whose two
largest values differ by less than float32 rounding would pick a different
winner in float32 than in float64 and move a whole gradient, which at batch
1000 (864,000 windows) happens every few runs. Exact data keep the check
deterministic on any device while a wrong kernel still shows up at full size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .op import conv_relu_maxpool2d, reference, uses_compiled_kernels

# (name, n, cin, h, w, cout, (kh, kw), (pad_h, pad_w), pool)
FULL_CASES = (
    ("block1-b1000", 1000, 1, 28, 28, 6, (5, 5), (0, 0), 2),
    ("block2-b1000", 1000, 6, 12, 12, 12, (5, 5), (0, 0), 2),
    ("odd-floor", 3, 2, 13, 11, 4, (3, 3), (0, 0), 2),
    ("padded-rect-pool3", 2, 3, 10, 10, 5, (2, 4), (1, 2), 3),
    ("wide-13ch", 2, 2, 9, 40, 13, (3, 11), (1, 1), 2),
    ("pool16-int32", 1, 1, 40, 40, 2, (3, 3), (0, 0), 16),
    ("batch1", 1, 1, 28, 28, 6, (5, 5), (0, 0), 2),
)
QUICK_CASES = (
    ("block1-b64", 64, 1, 28, 28, 6, (5, 5), (0, 0), 2),
    ("block2-b64", 64, 6, 12, 12, 12, (5, 5), (0, 0), 2),
)
DTYPES = (torch.float32, torch.float64)
# Largest accepted error relative to the reference's magnitude. The data make
# the float32 results exact in principle; the margin is for a device whose
# float32 arithmetic (e.g. a flush-to-zero or reassociating compiler) is
# slightly different, while a wrong winner or a dropped term is >= 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
TENSOR_NAMES = ("output", "grad_input", "grad_weight", "grad_bias")  # what _forward_and_grads returns, in order


@dataclass
class Mismatch:
    case: str
    dtype: torch.dtype
    tensor: str
    error: float


@dataclass
class DeviceReport:
    device: str
    kernels: str = "compiled kernels"  # or the pure-PyTorch reference, checked against itself
    cases: int = 0
    worst: dict = field(default_factory=dict)  # dtype -> (error, case, tensor)
    mismatches: list = field(default_factory=list)
    failure: str | None = None  # an exception raised by the fused op

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.failure is None

    def summary(self) -> str:
        if self.failure is not None:
            return f"{self.device} ({self.kernels}): FAILED ({self.failure})"
        worst = ", ".join(
            f"{str(dt).replace('torch.', '')} {err:.1e} ({case} {name})" for dt, (err, case, name) in self.worst.items()
        )
        verdict = "OK" if self.ok else "MISMATCH"
        line = f"{self.device} ({self.kernels}): {verdict}, {self.cases} cases; largest relative errors: {worst}"
        for m in self.mismatches[:5]:
            line += (
                f"\n    {m.case} {str(m.dtype).replace('torch.', '')} {m.tensor}: "
                f"relative error {m.error:.2e} > {TOLERANCE[m.dtype]:.0e}"
            )
        return line


def _dyadic(gen: torch.Generator, shape, low: int, high: int, scale: float) -> torch.Tensor:
    return torch.randint(low, high + 1, shape, generator=gen, dtype=torch.int64).double() * scale


def _case_tensors(case, seed: int):
    """Inputs, weight, bias and grad_output (float64, CPU) for one case."""
    _, n, cin, h, w, cout, (kh, kw), (pad_h, pad_w), pool = case
    gen = torch.Generator().manual_seed(seed)
    x = _dyadic(gen, (n, cin, h, w), -8, 8, 1 / 4)
    wt = _dyadic(gen, (cout, cin, kh, kw), -8, 8, 1 / 32)
    b = _dyadic(gen, (cout,), -8, 8, 1 / 32)
    ph, pw = (h + 2 * pad_h - kh + 1) // pool, (w + 2 * pad_w - kw + 1) // pool
    g = _dyadic(gen, (n, cout, ph, pw), -4, 4, 1 / 4)
    return x, wt, b, g


def _forward_and_grads(fn, x, wt, b, g, padding, pool):
    leaves = [t.detach().requires_grad_() for t in (x, wt, b)]
    y = fn(*leaves, padding, pool)
    grads = torch.autograd.grad(y, leaves, g)
    return (y.detach(), *grads)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.double()
    if got.shape != want.shape:
        return float("inf")
    if want.numel() == 0:
        return 0.0
    diff = (got - want).abs().max()
    if torch.isnan(diff):
        return float("inf")
    scale = want.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float(diff / scale)


def _fused(x, wt, b, padding, pool):
    return conv_relu_maxpool2d(x, wt, b, padding, pool)


def _stock(x, wt, b, padding, pool):
    return reference.conv_relu_maxpool2d(x, wt, b, padding, pool)


def check_device(device: str | torch.device, quick: bool = False, op: Callable | None = None) -> DeviceReport:
    """Run the battery (or its quick form: float32, the two seed blocks at
    batch 64) on `device`. `op` replaces the fused operator (tests use it to
    check that a wrong kernel is caught)."""
    device = torch.device(device)
    op = op or _fused
    report = DeviceReport(
        str(device), "compiled kernels" if uses_compiled_kernels(device) else "reference, not compiled"
    )
    cases, dtypes = (QUICK_CASES, (torch.float32,)) if quick else (FULL_CASES, DTYPES)
    for i, case in enumerate(cases):
        name, pool, padding = case[0], case[-1], case[-2]
        x, wt, b, g = (t.to(device) for t in _case_tensors(case, seed=1234 + i))
        want = _forward_and_grads(_stock, x, wt, b, g, padding, pool)
        for dtype in dtypes:
            args = [t.to(dtype) for t in (x, wt, b, g)]
            try:
                got = _forward_and_grads(op, *args, padding, pool)
            except Exception as exc:
                report.failure = f"{name} {dtype}: {type(exc).__name__}: {exc}"
                return report
            report.cases += 1
            for tensor, a, e in zip(TENSOR_NAMES, got, want):
                err = _relative_error(a, e)
                if err > report.worst.get(dtype, (-1.0,))[0]:
                    report.worst[dtype] = (err, name, tensor)
                if not err <= TOLERANCE[dtype]:
                    report.mismatches.append(Mismatch(name, dtype, tensor, err))
    return report


def available_devices() -> list[str]:
    """cpu, and every visible CUDA device."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def training_refusal(device: torch.device, op: Callable | None = None) -> str | None:
    """The quick check before training with fused kernels on `device`: None
    when they agree with stock, else the message to stop with."""
    report = check_device(device, quick=True, op=op)
    if report.ok:
        return None
    if report.failure is not None:
        what = f"they fail: {report.failure}"
    else:
        worst = max(report.mismatches, key=lambda m: m.error)
        what = (
            f"{len(report.mismatches)} mismatches, worst {worst.case} {str(worst.dtype).replace('torch.', '')} "
            f"{worst.tensor}: relative error {worst.error:.1e}"
        )
    return (
        f"the fused kernels disagree with the stock sequence on {device} ({what}); "
        f"train with --kernels stock, and run `python -m fmnist_ext.info --check` for the full report"
    )


def precheck_training(parser, kernels: str, device: torch.device, check_types: tuple = ("cuda",)) -> None:
    """What `train` checks before it starts with fused kernels; a refusal is
    one `prog: error:` line and exit 2. On CPU: that FMNIST_CPU_ISA, if set,
    names a kernel build this CPU has. On CUDA: the quick battery (the CPU
    kernels are covered by the test suite on the machine that built them,
    and CPU training should not pay for the check). `check_types` lets the
    tests run the battery on the CPU."""
    if kernels != "fused":
        return
    from .cli import fail, refuse_bad_cpu_isa

    device = torch.device(device)
    if device.type == "cpu":
        refuse_bad_cpu_isa(parser)
    if device.type in check_types:
        message = training_refusal(device)
        if message is not None:
            fail(parser, message)
