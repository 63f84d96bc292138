"""The compiled library uses the LibTorch stable ABI only, so that one build
serves every torch from its minimum on (README, "Supported versions").

What the library takes from torch's shared libraries is read off its dynamic
symbol table: every symbol it imports that is not the C/C++ runtime's or
CUDA's must be a C function of torch's stable C shim (aoti_torch_*,
torch_*). A mangled C++ symbol of c10, ATen or torch (c10::Error, at::empty,
the dispatcher...) would tie the build to one torch release again."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from fmnist_ext.op import _library

pytestmark = pytest.mark.skipif(not _library.LOADED, reason="needs the compiled library")

# The C and C++ runtimes, the CUDA runtime, and the linker's weak hooks.
# Mangled names in namespace std: _ZSt..., _ZNSt..., and the cv/ref-qualified
# members _ZNKSt, _ZNKRSt, _ZNOSt... (C++20 builds import some of those).
RUNTIME = re.compile(
    r"^(_ITM_|__gmon_start__|__cxa_|__gxx_|_Unwind_|__cuda|cuda|_ZSt|_ZN[KVRO]*St|_ZT[VIS]St|_ZTVN10__cxxabiv"
    r"|_Zdl|_Znw|_Zda|_Zna|__stack_chk|__tls_get_addr)"
)
STABLE = re.compile(r"^(aoti_torch_|torch_)")


def imported_symbols() -> list[str]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run([nm, "-D", "--undefined-only", str(_library.LIBRARY_PATH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    names = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    # Versioned symbols (name@GLIBC_2.2.5, @GLIBCXX_3.4, @CXXABI_1.3, @GCC_3.0) are the C/C++ runtime's.
    return [n for n in names if "@" not in n]


def test_library_imports_only_the_stable_c_shim_from_torch():
    names = imported_symbols()
    unstable = [n for n in names if not (STABLE.match(n) or RUNTIME.match(n))]
    assert unstable == [], f"symbols outside torch's stable C shim: {unstable[:20]}"
    assert any(n.startswith("torch_library_impl") or n == "aoti_torch_library_impl" for n in names)


def test_build_record_names_the_minimum_torch():
    info = _library.build_info()
    assert re.fullmatch(r"\d+\.\d+", info.TORCH_MIN_VERSION)
    assert _library.load_mismatch(info, "2.10.0", None) is not None  # older than every supported minimum
