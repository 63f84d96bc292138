"""Shared test setup.

FMNIST_REQUIRE_COMPILED=1 (set by scripts/test.sh, so by CI) turns a silent
fallback to the pure-PyTorch reference into a failed test session: the suite
must test the compiled kernels, not the reference against itself.
"""

import os

import pytest
import torch

from fmnist_ext.op import _library

CPU_ISAS_ORDER = ("default", "avx2", "avx512")


def pytest_sessionstart(session):
    if os.environ.get("FMNIST_REQUIRE_COMPILED", "") not in ("", "0"):
        if "cpu" not in _library.COMPILED_DEVICE_TYPES:
            pytest.exit(
                "FMNIST_REQUIRE_COMPILED is set but the compiled CPU kernels are not in use: "
                f"{_library.NOT_LOADED_REASON}",
                returncode=3,
            )


def supported_cpu_isas():
    """Every CPU kernel build this machine can run (lowest first)."""
    if "cpu" not in _library.COMPILED_DEVICE_TYPES:
        return []
    saved = os.environ.pop("FMNIST_CPU_ISA", None)
    try:
        best = _library.cpu_isa()
    finally:
        if saved is not None:
            os.environ["FMNIST_CPU_ISA"] = saved
    return list(CPU_ISAS_ORDER[: CPU_ISAS_ORDER.index(best) + 1])


requires_compiled_cpu = pytest.mark.skipif(
    "cpu" not in _library.COMPILED_DEVICE_TYPES,
    reason=f"compiled CPU kernels not loaded: {_library.NOT_LOADED_REASON}",
)


@pytest.fixture(params=supported_cpu_isas() or ["reference"])
def cpu_isa(request, monkeypatch):
    """Runs a test once per CPU kernel build (FMNIST_CPU_ISA)."""
    if request.param != "reference":
        monkeypatch.setenv("FMNIST_CPU_ISA", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
