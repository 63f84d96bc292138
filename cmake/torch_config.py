"""Print the facts CMake needs about the torch that will import the extension.

Run by CMakeLists.txt with the Python that builds the package. torch must be
importable by that Python: build with `pip install --no-build-isolation .`
so the extension is compiled against the very torch it will be loaded into.
"""

import sys

try:
    import torch
    from torch.utils import cpp_extension
except Exception as exc:  # pragma: no cover - exercised by a failing build
    print(
        f"cannot import torch with {sys.executable} ({exc}). fmnist_ext builds "
        "against the installed torch: install torch first, then build with "
        "`pip install --no-build-isolation .` (an isolated build environment "
        "would compile against a different torch).",
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

facts = {
    "TORCH_VERSION": torch.__version__,
    "TORCH_INCLUDE_DIRS": "|".join(cpp_extension.include_paths()),
    "TORCH_LIBRARY_DIRS": "|".join(cpp_extension.library_paths()),
    "TORCH_CXX11_ABI": str(int(torch.compiled_with_cxx11_abi())),
    "TORCH_CUDA_VERSION": torch.version.cuda or "",
    "TORCH_SITE_PACKAGES": str(__import__("pathlib").Path(torch.__file__).parent.parent),
}
for key, value in facts.items():
    print(f"{key}={value}")
