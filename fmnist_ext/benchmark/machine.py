"""What the figures were measured on: the machine, the software, the commit.

Recorded in every report (JSON `machine`) because a time means little
without them: CPU model and usable cores, load average at the start and end
(other work skews timings), torch and kernel status, allocator and thread
environment variables, and the git commit with whether the tree was dirty.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
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
    """The commit of the first of `repo_dir`, the current folder and this package's folder that is in git."""
    candidates = [p for p in (repo_dir, Path.cwd(), Path(__file__).resolve().parent) if p is not None]
    for d in candidates:
        commit = _git(["rev-parse", "HEAD"], d)
        if commit:
            status = _git(["status", "--porcelain", "--untracked-files=no"], d)
            return {"commit": commit, "dirty": bool(status), "dir": str(d)}
    return {"commit": None, "dirty": None, "dir": None}


def machine_description(device: torch.device, threads: int, repo_dir: Path | None) -> dict:
    import fmnist_ext

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    desc = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "loadavg_at_start": loadavg(),
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
