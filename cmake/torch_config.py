"""Print the facts CMake needs about the torch that will import the extension.

Run by CMakeLists.txt with the Python that builds the package: the torch it
imports provides the headers (the installed one with `pip install
--no-build-isolation .`, the one pip fetched into the build environment with a
plain `pip install .`). The library targets the stable ABI of the oldest
supported torch (TORCH_MIN_VERSION, pyproject.toml's dependency), so it loads
into that torch and every later one, whichever torch built it.
"""

import sys

try:
    import torch
    from torch.utils import cpp_extension
except Exception as exc:  # pragma: no cover - exercised by a failing build
    print(
        f"cannot import torch with {sys.executable} ({exc}). Build with `pip install .` "
        "(the build environment gets a torch from pyproject.toml's build requirements) or "
        "install torch first and build with `pip install --no-build-isolation .`.",
        file=sys.stderr,
    )
    sys.exit(1)

# The oldest torch supported: the one in pyproject.toml's dependencies.
pyproject = (__import__("pathlib").Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
minimum = __import__("re").search(r'"torch>=(\d+)\.(\d+)"', pyproject)
running = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if minimum and running < (int(minimum[1]), int(minimum[2])):
    print(
        f"fmnist_ext needs torch >= {minimum[1]}.{minimum[2]} (pyproject.toml); {sys.executable} "
        f"has torch {torch.__version__}. Install a supported torch, then build again.",
        file=sys.stderr,
    )
    sys.exit(1)

major, minor = (int(minimum[1]), int(minimum[2])) if minimum else running
facts = {
    "TORCH_VERSION": torch.__version__,
    # The stable ABI version the library targets (torch/csrc/stable/version.h):
    # [major][minor][patch][abi tag], one byte each from the top.
    "TORCH_MIN_VERSION": f"{major}.{minor}",
    "TORCH_TARGET_VERSION": f"0x{(major << 56) | (minor << 48):016x}ULL",
    "TORCH_INCLUDE_DIRS": "|".join(cpp_extension.include_paths()),
    "TORCH_LIBRARY_DIRS": "|".join(cpp_extension.library_paths()),
    "TORCH_CXX11_ABI": str(int(torch.compiled_with_cxx11_abi())),
    "TORCH_CUDA_VERSION": torch.version.cuda or "",
    "TORCH_SITE_PACKAGES": str(__import__("pathlib").Path(torch.__file__).parent.parent),
}
for key, value in facts.items():
    print(f"{key}={value}")
