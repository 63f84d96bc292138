"""A damaged install does not break `import fmnist_ext`: an
empty or invalid build record, a compiled library cut short (dlopen of a
truncated file can die of SIGBUS). The package falls back to the reference
with one warning, and `python -m fmnist_ext.info` says what is broken.

Each case damages a copy of the package (with its compiled library) and
imports that copy in a child process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fmnist_ext
from fmnist_ext.op import _library

pytestmark = pytest.mark.skipif(not _library.LOADED, reason="needs the compiled library to damage a copy of it")


def _half(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    "empty build record": ("_build_info.py", lambda p: p.write_text(""), "_build_info.py is damaged (AttributeError"),
    "build record with a syntax error": (
        "_build_info.py",
        lambda p: p.write_text('TORCH_VERSION = "2.13'),
        "_build_info.py is damaged (SyntaxError",
    ),
    "library cut in half": ("_C.so", _half, "_C.so is truncated"),
    "library of 100 bytes": ("_C.so", lambda p: p.write_bytes(p.read_bytes()[:100]), "_C.so is truncated"),
    "empty library": ("_C.so", lambda p: p.write_bytes(b""), "_C.so is not an ELF shared library (0 bytes)"),
}


@pytest.fixture
def package_copy(tmp_path):
    dest = tmp_path / "site" / "fmnist_ext"
    shutil.copytree(Path(fmnist_ext.__file__).parent, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("_C.so", "_build_info.py"):
        shutil.copy(_library.LIBRARY_DIR / name, dest / "op" / name)
    return dest


def _run(site: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=site, timeout=300)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_import_and_info_survive_and_say_what_is_broken(package_copy, case):
    name, damage, words = DAMAGE[case]
    damage(package_copy / "op" / name)
    site = package_copy.parent
    p = _run(site, "-c", "import fmnist_ext, json; print(json.dumps(fmnist_ext.kernels_status()))")
    assert p.returncode == 0, p.stderr
    assert str(site) in p.stdout or "reference" in p.stdout, p.stdout
    assert '"cpu": "reference"' in p.stdout and words in p.stdout, p.stdout
    assert "ReferenceFallbackWarning" in p.stderr and words in p.stderr, p.stderr
    p = _run(site, "-m", "fmnist_ext.info")
    assert p.returncode == 0 and "compiled library not loaded" in p.stdout and words in p.stdout, (p.stdout, p.stderr)


def test_the_undamaged_copy_loads_its_library(package_copy):
    p = _run(package_copy.parent, "-c", "import fmnist_ext; print(fmnist_ext.kernels_status()['cpu'])")
    assert p.returncode == 0 and p.stdout.strip() == "compiled", (p.stdout, p.stderr)
