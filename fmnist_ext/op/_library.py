"""Loading the compiled kernels, or explaining why the reference runs instead.

The compiled library ``fmnist_ext/op/_C.so`` registers the operators
``torch.ops.fmnist_ext.*`` with the PyTorch dispatcher. Its host code uses the
LibTorch stable ABI only, built for the oldest supported torch, so one build
loads into that torch and every later one (CMake records that minimum, the
torch whose headers built it and its CUDA version in ``_build_info.py``).
What can still mismatch is checked before loading: a torch older than the
build's minimum, and a CUDA build (it needs the CUDA runtime of its CUDA
major version, ``libcudart.so.<major>``) under a torch without that CUDA
major version -- a CPU-only torch, or one of another CUDA major version,
whose GPU driver may lack the build's. When the library cannot be loaded, the
package still works: the public API runs the pure-PyTorch reference, and one
warning says why and how to rebuild.

When Python imports this package from a source checkout (``python -m
fmnist_ext.train`` run in the repository puts the checkout first on the path),
the checkout has no compiled library; the one that ``pip install
--no-build-isolation .`` installed for the same version is used instead.

Set ``FMNIST_DISABLE_EXTENSION=1`` to force the reference path (the tests use
it to check the fallback).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import warnings
from pathlib import Path

import torch

from . import _elfcheck

PACKAGE_DIR = Path(__file__).parent


def _library_dir() -> Path:
    """Where _C.so and _build_info.py are: this package, or, from a source
    checkout, the installed build of the same version."""
    if os.path.exists(PACKAGE_DIR / "_C.so") or not os.path.exists(PACKAGE_DIR.parent.parent / "pyproject.toml"):
        return PACKAGE_DIR
    try:
        dist = importlib.metadata.distribution("fmnist-ext")
    except importlib.metadata.PackageNotFoundError:
        return PACKAGE_DIR
    # The checkout's version, read as text: the op layer imports nothing from the package around it.
    source = re.search(r'^__version__ = "([^"]+)"', (PACKAGE_DIR.parent / "__init__.py").read_text(), re.M)
    installed = Path(str(dist.locate_file("fmnist_ext/op/_C.so")))
    if source and dist.version == source.group(1) and os.path.exists(installed):
        return installed.parent
    return PACKAGE_DIR


LIBRARY_DIR = _library_dir()
LIBRARY_PATH = LIBRARY_DIR / "_C.so"
REBUILD_HINT = "rebuild with: pip install --no-build-isolation ."
OP_NAMESPACE = "fmnist_ext"
FORWARD_OP = f"{OP_NAMESPACE}::conv_relu_maxpool2d"
BACKWARD_OP = f"{OP_NAMESPACE}::_conv_relu_maxpool2d_backward"


class ReferenceFallbackWarning(UserWarning):
    """The compiled kernels are not in use; the pure-PyTorch reference runs."""


@functools.cache
def _read_build_info():
    """(the build record CMake wrote beside the library, None) or (None, what is wrong
    with it); read once. A damaged record (empty, cut short, edited) is a reason for the
    fallback, never an exception out of `import fmnist_ext`."""
    path = LIBRARY_DIR / "_build_info.py"
    if not os.path.exists(path):
        return None, "the build record _build_info.py is missing (incomplete install)"
    try:
        spec = importlib.util.spec_from_file_location("fmnist_ext.op._build_info", path)
        info = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(info)
        for name in ("TORCH_VERSION", "TORCH_MIN_VERSION", "TORCH_CUDA_VERSION"):
            if not isinstance(getattr(info, name), str):
                raise TypeError(f"{name} is a {type(getattr(info, name)).__name__}")
        _release(info.TORCH_MIN_VERSION)  # ValueError when it is not "major.minor"
    except Exception as e:  # SyntaxError, AttributeError, ...: whatever a damaged file raises
        return None, f"the build record {path} is damaged ({type(e).__name__}: {e})"
    return info, None


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch or CUDA version string ("2.15.0+cu132" -> (2, 15))."""
    parts = version.split("+")[0].split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        raise ValueError(f"not a version: {version!r}")
    return int(parts[0]), int(parts[1])


def load_mismatch(info, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why a library with build record `info` cannot load into torch
    `torch_version` whose CUDA version is `torch_cuda` (None: a CPU-only
    torch), or None when it can. The stable ABI makes every torch from the
    build's minimum on fit; a CUDA build also needs its CUDA major version."""
    running, minimum = _release(torch_version), _release(info.TORCH_MIN_VERSION)
    if running < minimum:
        return (
            f"it needs torch >= {info.TORCH_MIN_VERSION} (the oldest torch whose stable ABI it was "
            f"built for) but torch {torch_version} is running"
        )
    if info.WITH_CUDA and info.TORCH_CUDA_VERSION:
        built = info.TORCH_CUDA_VERSION.split(".")[0]
        if not torch_cuda:
            return (
                f"its CUDA kernels were built with CUDA {info.TORCH_CUDA_VERSION} but torch {torch_version} "
                f"has no CUDA (the library needs CUDA {built}'s runtime, libcudart.so.{built}); build it "
                "with FMNIST_CUDA=OFF for this torch"
            )
        if torch_cuda.split(".")[0] != built:
            return (
                f"its CUDA kernels were built with CUDA {info.TORCH_CUDA_VERSION} but torch {torch_version} "
                f"uses CUDA {torch_cuda}, another major version (its runtime and the GPU driver it needs "
                "differ)"
            )
    return None


def build_info():
    """The build record CMake wrote beside the library (None if missing or damaged)."""
    return _read_build_info()[0]


def _load() -> tuple[bool, str | None]:
    """Load the compiled library; return (loaded, reason it was not)."""
    if os.environ.get("FMNIST_DISABLE_EXTENSION", "") not in ("", "0"):
        return False, "FMNIST_DISABLE_EXTENSION is set"
    if not os.path.exists(LIBRARY_PATH):
        return False, f"the compiled library {LIBRARY_PATH.name} is not installed (the package was not built)"
    info, problem = _read_build_info()
    if info is None:
        return False, problem
    mismatch = load_mismatch(info, torch.__version__, torch.version.cuda)
    if mismatch is not None:
        return False, mismatch
    broken = _elfcheck.truncation(LIBRARY_PATH)  # dlopen of a truncated file can die of SIGBUS
    if broken is not None:
        return False, f"the compiled library {LIBRARY_PATH} is {broken}"
    try:
        torch.ops.load_library(str(LIBRARY_PATH))
    except (OSError, RuntimeError) as exc:
        return False, f"{LIBRARY_PATH.name} could not be loaded ({exc})"
    return True, None


LOADED, NOT_LOADED_REASON = _load()

if not LOADED:
    warnings.warn(
        f"fmnist_ext: using the pure-PyTorch reference instead of the compiled "
        f"kernels because {NOT_LOADED_REASON}; {REBUILD_HINT}",
        ReferenceFallbackWarning,
        stacklevel=2,
    )


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether the compiled library registered a kernel of op `qualname`
    ("fmnist_ext::name") for `dispatch_key` ("CPU", "CUDA")."""
    if not LOADED:
        return False
    name = qualname.split("::", 1)[1]
    return getattr(torch.ops.fmnist_ext, name).default.has_kernel_for_dispatch_key(dispatch_key)


# Device types ("cpu", "cuda") whose tensors run the compiled kernels.
COMPILED_DEVICE_TYPES = frozenset(dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")) if has_kernel(FORWARD_OP, key))


def built_torch_version() -> str | None:
    """The torch whose headers built the library."""
    info = build_info()
    return None if info is None else info.TORCH_VERSION


def minimum_torch_version() -> str | None:
    """The oldest torch the library loads into (its stable ABI target)."""
    info = build_info()
    return None if info is None else info.TORCH_MIN_VERSION


CPU_ISAS = ("default", "avx2", "avx512")  # lowest first; csrc/cpu/conv_relu_maxpool2d_kernel.cpp


def cpu_isa_request_error() -> str | None:
    """Why FMNIST_CPU_ISA cannot be honoured (unknown value, or more than this
    CPU supports), or None when it is unset or fine. The CPU kernels refuse the
    same values at every call; this lets the tools say so in one line first."""
    want = os.environ.get("FMNIST_CPU_ISA", "")
    if want == "" or "cpu" not in COMPILED_DEVICE_TYPES:
        return None
    if want not in CPU_ISAS:
        return f"FMNIST_CPU_ISA must be one of {', '.join(CPU_ISAS)} (or unset for the best one); got {want!r}"
    best = torch.ops.fmnist_ext._cpu_best_isa()
    if CPU_ISAS.index(want) > CPU_ISAS.index(best):
        return f"FMNIST_CPU_ISA={want} is not supported by this CPU (allowed here: {', '.join(CPU_ISAS[: CPU_ISAS.index(best) + 1])})"
    return None


def cpu_isa() -> str | None:
    """The CPU kernel build in use (avx512 / avx2 / default), or None.
    Raises ValueError naming FMNIST_CPU_ISA when that variable is invalid."""
    if "cpu" not in COMPILED_DEVICE_TYPES:
        return None
    error = cpu_isa_request_error()
    if error is not None:
        raise ValueError(error)
    return torch.ops.fmnist_ext._cpu_isa()


def kernels_status() -> dict:
    """What runs where: compiled kernels per device type, torch versions."""
    return {
        "compiled_library_loaded": LOADED,
        "not_loaded_reason": NOT_LOADED_REASON,
        "cpu": "compiled" if "cpu" in COMPILED_DEVICE_TYPES else "reference",
        "cuda": "compiled" if "cuda" in COMPILED_DEVICE_TYPES else "reference",
        "cpu_isa": cpu_isa(),
        "built_against_torch": built_torch_version(),
        "minimum_torch": minimum_torch_version(),
        "running_torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
