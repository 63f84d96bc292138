"""pytest hooks and fixtures for the whole suite: op/ tests the operator
library, app/ the Fashion-MNIST application. Helpers live beside this file
(op_helpers.py, rounding_bounds.py; fmnist_app_helpers.py, cli_helpers.py)
and are imported by name; markers are declared in pyproject.toml.

FMNIST_REQUIRE_COMPILED=1 (set by scripts/test.sh, so by CI) turns a silent
fallback to the pure-PyTorch reference into a failed test session: the suite
must test the compiled kernels, not the reference against itself.
FMNIST_REQUIRE_CUDA_BUILD=1 (CI's stages that test a CUDA build) also requires
the compiled CUDA kernels to be registered (no GPU is needed for that).
"""

import os

import pytest
import torch

from fmnist_ext.op import _library


def pytest_sessionstart(session):
    required = os.environ.get("FMNIST_REQUIRE_COMPILED", "") not in ("", "0")
    if required and "cpu" not in _library.COMPILED_DEVICE_TYPES:
        pytest.exit(
            f"FMNIST_REQUIRE_COMPILED is set but the compiled CPU kernels are not in use: {_library.NOT_LOADED_REASON}",
            returncode=3,
        )
    if (
        os.environ.get("FMNIST_REQUIRE_CUDA_BUILD", "") not in ("", "0")
        and "cuda" not in _library.COMPILED_DEVICE_TYPES
    ):
        pytest.exit(
            "FMNIST_REQUIRE_CUDA_BUILD is set but no compiled CUDA kernel is registered: "
            f"{_library.NOT_LOADED_REASON or 'the library was built without CUDA'}",
            returncode=3,
        )


@pytest.fixture(autouse=True)
def _cpu_isa(request, monkeypatch):
    """Sets FMNIST_CPU_ISA for a test case carrying a `cpu_isa` mark
    (op_helpers.cpu_isas_and_cuda gives each cpu case one)."""
    mark = request.node.get_closest_marker("cpu_isa")
    if mark is not None:
        monkeypatch.setenv("FMNIST_CPU_ISA", mark.args[0])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Stock's float32 convolutions on a GPU in true float32 (cuDNN may use
    TF32 otherwise), so the fused op is compared with a float32 result."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
