"""What every measurement shares: the package pieces it uses, clocks, the
correctness gate, interleaved timing, cold torch.compile, the machine's
ceilings and its description."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils import benchmark as tbench

# The package pieces the benchmark uses beyond the model, imported here only.
from .. import cli
from ..data import MEAN, STD
from ..op._torch_internals import default_inductor_cache_dir, disable_compile_caches

__all__ = ["MEAN", "STD", "cli"]


def clock(device: torch.device) -> float:
    """perf_counter once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def fp32_means_fp32(device: torch.device) -> None:
    """TF32 off: it would not pass the gate against float64 and would inflate the sgemm ceiling."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


# --- the correctness gate -------------------------------------------------------

RTOL = ATOL_SCALE = 1e-4  # |impl - ref| <= ATOL_SCALE * max|ref| + RTOL * |ref|, elementwise
STOCK_ERROR_FACTOR = 4.0  # against float64: "about as accurate as stock"
GATE = (
    f"elementwise |impl - ref| <= max({ATOL_SCALE:g} * max|ref|, {STOCK_ERROR_FACTOR:g} * stock's max error) + {RTOL:g}"
    " * |ref|, ref = stock in float64, for the output and every gradient (whole model: the loss and every gradient,"
    " or the logits), on the timed inputs, before timing"
)


def compare(got: Sequence, want: Sequence, names: Sequence[str], exact: Sequence | None = None) -> dict:
    """{"ok", "reason", "max_rel_err"}: is `got` (an implementation's output and
    gradients) stock's `want`, tensor by tensor? With `exact` (stock in float64 on
    the same inputs) both are compared with it, and `got` passes when it is about as
    accurate as stock: |got - exact| <= max(ATOL_SCALE * max|exact|, STOCK_ERROR_FACTOR
    * max|want - exact|) + RTOL * |exact|. Large batches sum hundreds of thousands of
    float32 terms into a weight gradient, so two correct summation orders differ by
    more than a fixed tolerance; stock's own error is the yardstick there."""
    errs: dict[str, float] = {}

    def verdict(reason=None):
        return {"ok": reason is None, "reason": reason, "max_rel_err": errs}

    if len(got) != len(want):
        return verdict(f"returned {len(got)} tensors, expected {len(want)}")
    for i, (name, a, r) in enumerate(zip(names, got, want)):
        if not isinstance(a, torch.Tensor):
            return verdict(f"{name} is {type(a).__name__}, not a tensor")
        if a.shape != r.shape or a.dtype != r.dtype:
            return verdict(f"{name} has shape {tuple(a.shape)} {a.dtype}, stock {tuple(r.shape)} {r.dtype}")
        a, r = a.detach().double(), r.detach().double()
        if not torch.isfinite(a).all():
            return verdict(f"{name} has non-finite values")
        amax = r.abs().max().item() if r.numel() else 0.0
        atol, what = ATOL_SCALE * amax, "stock"
        if exact is not None:
            e = exact[i].detach().double().to(r.device)
            stock_err = (r - e).abs().max().item() if r.numel() else 0.0
            amax = e.abs().max().item() if e.numel() else 0.0
            atol, r, what = max(ATOL_SCALE * amax, STOCK_ERROR_FACTOR * stock_err), e, "the float64 reference"
        diff = (a - r).abs()
        max_diff = diff.max().item() if diff.numel() else 0.0
        errs[name] = max_diff / amax if amax > 0 else max_diff
        n_bad = int((diff > atol + RTOL * r.abs()).sum().item())
        if n_bad:
            return verdict(
                f"{name} differs from {what} at {n_bad}/{r.numel()} elements "
                f"(max |diff| {max_diff:.3g}, max |ref| {amax:.3g}, rtol {RTOL:g}, atol {atol:.3g})"
            )
    return verdict()


# --- timing -----------------------------------------------------------------------


def stats(times: list[float]) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "iqr_s": q[2] - q[0], "min_s": times[0], "n": len(times)}


def autorange(run: Callable, threads: int, min_run_time: float) -> list[float]:
    """Per-call times of `run`, in blocks of calls (torch.utils.benchmark; it synchronizes CUDA)."""
    timer = tbench.Timer(stmt="run()", globals={"run": run}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).times


def time_interleaved(runs: dict[str, Callable], min_run_time: float, threads: int, rounds: int) -> dict[str, dict]:
    """Per-call time of each callable (torch.utils.benchmark, which synchronizes CUDA),
    measured in `rounds` rounds that visit every callable once, order rotated per round,
    so a drift of the machine hits them all alike; the median over all rounds."""
    names, times = list(runs), {n: [] for n in runs}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name] += autorange(runs[name], threads, min_run_time / rounds)
    return {n: stats(t) for n, t in times.items()}


@contextlib.contextmanager
def cold_compiles():
    """Compile times that are cold compiles, not hits in caches an earlier run left:
    inductor's FX-graph and AOTAutograd caches off, and a fresh inductor (and triton)
    cache folder for the duration, unless the user chose one."""
    disable_compile_caches()
    user = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # importing torch._dynamo sets it to the default
    if user and os.path.abspath(user) != os.path.abspath(default_inductor_cache_dir() or ""):
        yield user
        return
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-inductor-") as d:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(d, "triton"))
        try:
            yield d
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# --- the machine ----------------------------------------------------------------------


def ceilings(device: torch.device, threads: int, quick: bool) -> dict:
    """The device's ceilings, measured now: a large float32 matmul (GFLOP/s) and a
    large copy (GB/s, bytes read + written)."""
    n, mib, t = (1024, 64, 0.2) if quick else (4096, 256, 1.0)
    a = torch.randn(n, n, device=device)
    c = torch.empty_like(a)
    sgemm_s = statistics.median(autorange(lambda: torch.mm(a, a, out=c), threads, t))
    a = c = None  # freed before the copy's buffers
    src = torch.randn(mib << 18, device=device)
    dst = torch.empty_like(src)
    copy_s = statistics.median(autorange(lambda: dst.copy_(src), threads, t))
    nbytes = 2 * src.numel() * 4
    return {
        "sgemm": {"n": n, "median_s": sgemm_s, "gflops": 2 * n**3 / sgemm_s / 1e9},
        "copy": {"bytes": nbytes, "median_s": copy_s, "gbps": nbytes / copy_s / 1e9},
    }


def loadavg() -> list[float] | None:
    with contextlib.suppress(AttributeError, OSError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu(key: str) -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.lower().startswith(key):
                return line.split(":", 1)[1].strip()
    return None


SIMD_FLAGS = ("sse4", "avx", "fma", "f16c", "amx")  # the CPU flags the kernels' builds and torch's care about


def machine(device: torch.device, threads: int, repo_dir: Path | None) -> dict:
    """What the figures were measured on: CPU, load, software, kernels, environment, commit."""
    import fmnist_ext

    git = {"commit": None, "dirty": None, "dir": None}
    for d in (p for p in (repo_dir, Path.cwd(), Path(__file__).resolve().parent) if p is not None):
        commit = _git(["rev-parse", "HEAD"], d)
        if commit:
            dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], d))
            git = {"commit": commit, "dirty": dirty, "dir": str(d)}
            break
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("MALLOC_", "FMNIST_CPU_ISA", "FMNIST_DISABLE_EXTENSION", "OMP_", "MKL_"))
    }
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [f for f in (_cpu("flags") or "").split() if f.startswith(SIMD_FLAGS)],
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": loadavg(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "fmnist_ext": fmnist_ext.__version__,
        "kernels_status": fmnist_ext.kernels_status(),
        "fused_uses_compiled_kernels": fmnist_ext.uses_compiled_kernels(device),
        "git": git,
        "env": env,  # allocator, kernel build and thread settings
    }
