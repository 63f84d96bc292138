"""A short battery of the fused operator against the stock sequence, per device.

`python -m fmnist_ext.info --check` runs the full battery on every device it
can see; `python -m fmnist_ext.train` with fused kernels on a CUDA device runs
the training form once before training and refuses to start on a mismatch,
on a backward that does not repeat bit for bit, or on any error the device
raises, asynchronous ones included (a kernel that is wrong on this GPU must
not silently train a bad model, and a fault must be one line, not a
traceback from the middle of training).

The training form runs what training runs: both model blocks at the
training batch size with training's output masks (block 1's input needs no
gradient), and both at 1,001 images with the CUDA launch plans made for 4
SMs (FMNIST_CUDA_SM_COUNT, csrc/cuda/sm_count.h): grad_weight then runs
many chunks of images per block (block 2: 126 chunks of 8 on 8 blocks,
block 1: 251 chunks of 4), the last chunk and the forward's last block hold
one image, as a large batch on a large GPU plans them. Each case's backward
runs twice and must repeat bit for bit (the CUDA reductions have a fixed
order).

Every case compares the output and the gradients (input, weight, bias) of
`fmnist_ext.conv_relu_maxpool2d` with `max_pool2d(relu(conv2d))` computed
in float64 on the same device with cuDNN off (its Winograd/FFT algorithms
transform the data and would round even these exact inputs). Errors are
relative to the magnitude of the reference tensor (max |got - want| / max
|want|), so they do not grow with the batch.

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

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .op import conv_relu_maxpool2d, reference, uses_compiled_kernels


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    cin: int
    h: int
    w: int
    cout: int
    kernel: tuple[int, int]
    padding: tuple[int, int]
    pool: int
    grad_input: bool = True  # training's output mask: block 1's input needs no gradient
    sms: int | None = None  # the SM count the CUDA plans see (FMNIST_CUDA_SM_COUNT); None: the device's


def block1(n: int, **kw) -> Case:
    return Case(f"block1-b{n}", n, 1, 28, 28, 6, (5, 5), (0, 0), 2, grad_input=False, **kw)


def block2(n: int, **kw) -> Case:
    return Case(f"block2-b{n}", n, 6, 12, 12, 12, (5, 5), (0, 0), 2, **kw)


# The multi-chunk plans (see the module's docstring).
MULTI_CHUNK_BATCH, MULTI_CHUNK_SMS = 1001, 4


def training_cases(batch_size: int) -> tuple[Case, ...]:
    """Both model blocks as training runs them at `batch_size`, and with the
    plans of a large batch on a large GPU."""
    many = [
        dataclasses.replace(c, name=f"{c.name}-{MULTI_CHUNK_SMS}sm", sms=MULTI_CHUNK_SMS)
        for c in (block1(MULTI_CHUNK_BATCH), block2(MULTI_CHUNK_BATCH))
    ]
    return (block1(batch_size), block2(batch_size), *many)


TRAINING_BATCH = 1000  # the baseline recipe's; `info --check` runs the training form at it
FULL_CASES = (
    *training_cases(TRAINING_BATCH),
    Case("odd-floor", 3, 2, 13, 11, 4, (3, 3), (0, 0), 2),
    Case("padded-rect-pool3", 2, 3, 10, 10, 5, (2, 4), (1, 2), 3),
    Case("wide-13ch", 2, 2, 9, 40, 13, (3, 11), (1, 1), 2),
    Case("pool16-int32", 1, 1, 40, 40, 2, (3, 3), (0, 0), 16),
    Case("batch1", 1, 1, 28, 28, 6, (5, 5), (0, 0), 2),
)
DTYPES = (torch.float32, torch.float64)
# Largest accepted error relative to the reference's magnitude. The data make
# the float32 results exact in principle; the margin is for a device whose
# float32 arithmetic (e.g. a flush-to-zero or reassociating compiler) is
# slightly different, while a wrong winner or a dropped term is >= 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
TENSOR_NAMES = ("output", "grad_input", "grad_weight", "grad_bias")


@dataclass
class Mismatch:
    case: str
    dtype: torch.dtype
    tensor: str
    error: float  # relative to the reference's magnitude; for a repeat, to the first run's
    repeat: bool = False  # the backward's second run differed from its first

    def describe(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        if self.repeat:
            return f"{self.case} {dt} {self.tensor}: a second backward differs (relative {self.error:.1e}; must repeat bit for bit)"
        return f"{self.case} {dt} {self.tensor}: relative error {self.error:.2e} > {TOLERANCE[self.dtype]:.0e}"


@dataclass
class DeviceReport:
    device: str
    kernels: str = "compiled kernels"  # or the pure-PyTorch reference, checked against itself
    cases: int = 0
    worst: dict = field(default_factory=dict)  # dtype -> (error, case, tensor)
    mismatches: list = field(default_factory=list)
    failure: str | None = None  # an exception raised by the fused op or the device
    seconds: float = 0.0

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
        line = (
            f"{self.device} ({self.kernels}): {verdict}, {self.cases} cases in {self.seconds:.2f} s; "
            f"backward repeats bit for bit: {'no' if any(m.repeat for m in self.mismatches) else 'yes'}; "
            f"largest relative errors: {worst}"
        )
        for m in self.mismatches[:5]:
            line += f"\n    {m.describe()}"
        return line


def _dyadic(gen: torch.Generator, shape, low: int, high: int, scale: float) -> torch.Tensor:
    return torch.randint(low, high + 1, shape, generator=gen, dtype=torch.int64).double() * scale


def case_tensors(case: Case, seed: int):
    """Inputs, weight, bias and grad_output (float64, CPU) for one case."""
    gen = torch.Generator().manual_seed(seed)
    x = _dyadic(gen, (case.n, case.cin, case.h, case.w), -8, 8, 1 / 4)
    wt = _dyadic(gen, (case.cout, case.cin, *case.kernel), -8, 8, 1 / 32)
    b = _dyadic(gen, (case.cout,), -8, 8, 1 / 32)
    (kh, kw), (pad_h, pad_w) = case.kernel, case.padding
    ph, pw = (case.h + 2 * pad_h - kh + 1) // case.pool, (case.w + 2 * pad_w - kw + 1) // case.pool
    g = _dyadic(gen, (case.n, case.cout, ph, pw), -4, 4, 1 / 4)
    return x, wt, b, g


def _forward_and_grads(fn, x, wt, b, g, padding, pool, grad_input=True, repeat=False):
    """(output, grad_input or None, grad_weight, grad_bias) and, with repeat,
    the three gradients of a second backward through the same graph."""
    leaves = [x.detach().requires_grad_(grad_input), wt.detach().requires_grad_(), b.detach().requires_grad_()]
    y = fn(*leaves, padding, pool)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(y, wanted, g, retain_graph=repeat)
    full = ((None,) if not grad_input else ()) + tuple(grads)
    again = None
    if repeat:
        again = ((None,) if not grad_input else ()) + tuple(torch.autograd.grad(y, wanted, g))
    return (y.detach(), *full), again


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


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _fused(x, wt, b, padding, pool):
    return conv_relu_maxpool2d(x, wt, b, padding, pool)


def _stock(x, wt, b, padding, pool):
    return reference.conv_relu_maxpool2d(x, wt, b, padding, pool)


def _synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that an asynchronous fault is
    raised here, inside the check's guarded region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _sm_count(sms: int | None):
    """FMNIST_CUDA_SM_COUNT=sms for the CUDA plans made inside (None: unchanged)."""
    if sms is None:
        yield
        return
    key = "FMNIST_CUDA_SM_COUNT"
    old = os.environ.get(key)
    os.environ[key] = str(sms)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def check_device(
    device: str | torch.device, quick: bool = False, op: Callable | None = None, batch_size: int = TRAINING_BATCH
) -> DeviceReport:
    """Run the battery (or its training form, quick: float32, training_cases
    at `batch_size`) on `device`. `op` replaces the fused operator (tests use
    it to check that a wrong kernel is caught)."""
    device = torch.device(device)
    op = op or _fused
    report = DeviceReport(
        str(device), "compiled kernels" if uses_compiled_kernels(device) else "reference, not compiled"
    )
    cases, dtypes = (training_cases(batch_size), (torch.float32,)) if quick else (FULL_CASES, DTYPES)
    t0 = time.perf_counter()
    where = [""]  # what ran when an exception escaped
    try:
        for i, case in enumerate(cases):
            _check_case(report, case, device, dtypes, op, 1234 + i, where)
    except Exception as exc:  # a kernel or device error (CUDA faults included): the verdict, not a traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        report.failure = f"{where[0]}: {type(exc).__name__}: {first}"
    report.seconds = time.perf_counter() - t0
    return report


def _check_case(report: DeviceReport, case: Case, device, dtypes, op, seed: int, where: list) -> None:
    """One case in each dtype, into `report`; where[0] says what runs."""
    where[0] = f"{case.name} data"
    x, wt, b, g = (t.to(device) for t in case_tensors(case, seed))
    where[0] = f"{case.name} stock reference"
    with torch.backends.cudnn.flags(enabled=False):  # forward and backward (see the module's docstring)
        want, _ = _forward_and_grads(_stock, x, wt, b, g, case.padding, case.pool, case.grad_input)
        _synchronize(device)
    for dtype in dtypes:
        where[0] = f"{case.name} {dtype}"
        args = [t.to(dtype) for t in (x, wt, b, g)]
        with _sm_count(case.sms):
            got, again = _forward_and_grads(op, *args, case.padding, case.pool, case.grad_input, repeat=True)
            _synchronize(device)  # inside the guard: a fault of these launches surfaces here
        report.cases += 1
        for tensor, a, e in zip(TENSOR_NAMES, got, want):
            if e is None:
                continue
            err = _relative_error(a, e)
            if err > report.worst.get(dtype, (-1.0,))[0]:
                report.worst[dtype] = (err, case.name, tensor)
            if not err <= TOLERANCE[dtype]:
                report.mismatches.append(Mismatch(case.name, dtype, tensor, err))
        for tensor, a, a2 in zip(TENSOR_NAMES[1:], got[1:], again):
            if a is not None and not _same_bits(a, a2):
                report.mismatches.append(Mismatch(case.name, dtype, tensor, _relative_error(a2, a.double()), True))


def available_devices() -> list[str]:
    """cpu, and every visible CUDA device."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def training_refusal(device: torch.device, op: Callable | None = None, batch_size: int = TRAINING_BATCH) -> str | None:
    """The check before training with fused kernels on `device` at
    `batch_size`: None when they agree with stock, else the message to stop with."""
    report = check_device(device, quick=True, op=op, batch_size=batch_size)
    if report.ok:
        return None
    if report.failure is not None:
        what = f"they fail: {report.failure}"
    else:
        worst = max(report.mismatches, key=lambda m: (m.repeat, m.error))
        what = f"{len(report.mismatches)} mismatches, worst {worst.describe()}"
    return (
        f"the fused kernels disagree with the stock sequence on {device} ({what}); "
        f"train with --kernels stock, and run `python -m fmnist_ext.info --check` for the full report"
    )


def precheck_training(
    parser, kernels: str, device: torch.device, batch_size: int = TRAINING_BATCH, check_types: tuple = ("cuda",)
) -> None:
    """What `train` checks before it starts with fused kernels; a refusal is
    one `prog: error:` line and exit 2. On CPU: that FMNIST_CPU_ISA, if set,
    names a kernel build this CPU has. On CUDA: the training form of the
    battery at training's batch size (the CPU
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
        message = training_refusal(device, batch_size=batch_size)
        if message is not None:
            fail(parser, message)
