"""Builds and drives the CUDA execution harness (harness.cpp) from pytest.

The harness is a standalone executable (no Python, no torch inside), so it
can run under ThreadSanitizer or AddressSanitizer without preloading a
sanitizer runtime into Python. Tensors travel as files in harness.cpp's
format: int64 ndim, sizes, strides (elements), element size, storage bytes,
then the storage.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# mutation_check.py points this at a mutated copy of csrc/.
CSRC = Path(os.environ.get("FMNIST_HARNESS_CSRC") or HERE.parents[1] / "csrc")

SANITIZER_FLAGS = {
    "tsan": ["-fsanitize=thread"],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
}
SANITIZER_ENV = {
    # halt_on_error: the first race fails the run; second_deadlock_stack for
    # readable reports. The harness's own threads are the only ones.
    "tsan": {"TSAN_OPTIONS": "halt_on_error=1 abort_on_error=0 exitcode=66"},
    "asan": {"ASAN_OPTIONS": "detect_leaks=1 abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1 halt_on_error=1"},
}


def find_compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _build_cmd(sanitizer: str, exe: Path, src: Path | None, csrc: Path | None) -> list[str]:
    cxx = find_compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++/clang++) on PATH; set CXX")
    return [
        cxx,
        "-std=c++20",
        "-O1",
        "-g",
        *SANITIZER_FLAGS[sanitizer],
        "-rdynamic",
        f"-I{csrc or CSRC}",
        f"-I{HERE}",
        str(src or HERE / "harness.cpp"),
        "-o",
        str(exe),
        "-pthread",
        "-ldl",
    ]


def build_all(
    sanitizers: list[str], out_dir: Path, src: Path | None = None, csrc: Path | None = None
) -> dict[str, Path]:
    """Compiles harness.cpp (or `src`, for mutation checks) once per sanitizer,
    the compilers running in parallel; raises with the compiler output on failure."""
    jobs = {}
    for san in sanitizers:
        exe = out_dir / f"harness_{san}"
        cmd = _build_cmd(san, exe, src, csrc)
        jobs[san] = (exe, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    errors = []
    for _exe, cmd, proc in jobs.values():
        log, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"harness build failed ({' '.join(cmd)}):\n{log}")
    if errors:
        raise RuntimeError("\n".join(errors))
    return {san: exe for san, (exe, _, _) in jobs.items()}


# The counting build (counter.h): GCC's kernel-address instrumentation with
# every check an outlined call (counter.cpp defines the calls), no stack or
# global-variable checks; -O2 without vectorisation, close to what the GPU
# compiler keeps in registers (the GPU has no SIMD within a thread).
COUNTER_FLAGS = [
    "-fsanitize=kernel-address",
    "--param=asan-instrumentation-with-call-threshold=0",
    "--param=asan-stack=0",
    "--param=asan-globals=0",
]


def build_counter(out_dir: Path, src: Path | None = None) -> Path:
    """Compiles the counting harness (harness.cpp, or `src`: count_selftest.cpp)
    with counter.cpp; returns the executable."""
    # GCC's --param spelling of the flags (clang takes them as -mllvm options).
    cxx = os.environ.get("CXX") if "g++" in os.path.basename(os.environ.get("CXX", "")) else shutil.which("g++")
    if cxx is None:
        raise FileNotFoundError("the counting build needs g++ (COUNTER_FLAGS are GCC's); none on PATH")
    src = src or HERE / "harness.cpp"
    exe = out_dir / f"{src.stem}_count"
    obj = out_dir / "counter.o"
    common = ["-std=c++20", "-O2", "-fno-tree-vectorize", "-DFMNIST_EMU_COUNT", f"-I{CSRC}", f"-I{HERE}"]
    cmds = [
        [cxx, *common, "-c", str(HERE / "counter.cpp"), "-o", str(obj)],
        [cxx, *common, *COUNTER_FLAGS, "-rdynamic", str(src), str(obj), "-o", str(exe), "-pthread", "-ldl"],
    ]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"counter build failed ({' '.join(cmd)}):\n{r.stdout}{r.stderr}")
    return exe


def write_tensor(path: Path, t: torch.Tensor) -> None:
    t = t.detach()
    if t.numel() == 0:
        span = 0
    else:
        span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    storage = t.as_strided((span,), (1,)).contiguous()
    header = [t.dim(), *t.shape, *t.stride(), t.element_size(), span * t.element_size()]
    with open(path, "wb") as f:
        f.write(struct.pack(f"<{len(header)}q", *header))
        f.write(storage.numpy().tobytes())


def read_tensor(path: Path, dtype: torch.dtype) -> torch.Tensor:
    import numpy as np  # here, not at import: the GPU tests of op/test_cuda.py run without numpy

    _NP = {torch.float32: np.float32, torch.float64: np.float64, torch.uint8: np.uint8, torch.int32: np.int32}
    raw = path.read_bytes()
    nd = struct.unpack_from("<q", raw, 0)[0]
    head = struct.unpack_from(f"<{2 * nd + 2}q", raw, 8)
    sizes, elem, nbytes = head[:nd], head[2 * nd], head[2 * nd + 1]
    assert elem == torch.empty((), dtype=dtype).element_size(), (path, elem, dtype)
    data = np.frombuffer(raw, dtype=_NP[dtype], offset=8 * (2 * nd + 3), count=nbytes // elem)
    return torch.from_numpy(data.copy()).reshape(sizes)


def write_case(d: Path, name: str, meta: dict, tensors: dict) -> None:
    lines = [
        f"{k} {' '.join(str(v) for v in (vs if isinstance(vs, (list, tuple)) else [vs]))}" for k, vs in meta.items()
    ]
    (d / f"{name}.meta").write_text("\n".join(lines) + "\n")
    for key, t in tensors.items():
        write_tensor(d / f"{name}.{key}", t)


def run(exe: Path, sanitizer: str, d: Path, names: list[str], timeout: float = 600, env: dict | None = None):
    """Runs the cases `names` of folder d; `env` adds environment variables
    (FMNIST_CUDA_SM_COUNT: the SM count every plan sees)."""
    env = dict(os.environ, **SANITIZER_ENV[sanitizer], **(env or {}))
    return subprocess.run([str(exe), str(d), *names], capture_output=True, text=True, env=env, timeout=timeout)
