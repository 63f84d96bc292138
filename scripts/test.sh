#!/usr/bin/env bash
# The project's test command (see README): on a fresh machine it makes a
# virtual environment (.venv, or the active one), installs torch and the build
# and test tools, builds fmnist_ext against that torch, and runs the whole
# test suite, speed checks included. It fails if the compiled kernels are not
# the ones under test (FMNIST_REQUIRE_COMPILED=1), so a silent fallback to the
# pure-PyTorch reference cannot pass.
#
#   bash scripts/test.sh [pytest args...]
#
# Environment: TORCH_SPEC (default "torch>=2.11"), FMNIST_VENV (default .venv;
# ignored when a venv is active); the build's own options (FMNIST_CUDA,
# FMNIST_WERROR: see CMakeLists.txt) pass through, and FMNIST_CUDA=IF_TORCH
# means ON (and FMNIST_REQUIRE_CUDA_BUILD=1) when the installed torch has
# CUDA, OFF when it has not. One build serves every torch from the minimum on
# (the stable ABI), which CI checks with two more variables:
#   FMNIST_WHEEL_OUT=DIR  build a wheel into DIR (pip wheel) and install it;
#   FMNIST_WHEEL=FILE     install that wheel, built elsewhere, instead of
#                         building (its CUDA kernels are required when it has
#                         some and this torch has CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if [ -z "${VIRTUAL_ENV:-}" ]; then
  venv=${FMNIST_VENV:-.venv}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  py="$root/$venv/bin/python"
else
  py=python
fi

"$py" -m pip install -q --upgrade pip >/dev/null
"$py" -m pip install -q "${TORCH_SPEC:-torch>=2.11}" "scikit-build-core>=0.10" cmake ninja
torch_version=$("$py" -c 'import torch; print(torch.__version__)')
torch_cuda=$("$py" -c 'import torch; print(torch.version.cuda or "")')
if [ "${FMNIST_CUDA:-}" = "IF_TORCH" ]; then
  if [ -n "$torch_cuda" ]; then
    export FMNIST_CUDA=ON FMNIST_REQUIRE_CUDA_BUILD=1
  else
    export FMNIST_CUDA=OFF
  fi
fi

install_wheel() {  # the wheel's dependencies, then exactly this build of fmnist_ext
  "$py" -m pip install -q "$1[test]"
  "$py" -m pip install -q --force-reinstall --no-deps "$1"
}

if [ -n "${FMNIST_WHEEL:-}" ]; then
  wheel=$(cd "$(dirname "$FMNIST_WHEEL")" && pwd)/$(basename "$FMNIST_WHEEL")
  install_wheel "$wheel"
  if [ -n "$torch_cuda" ] && "$py" -c 'import sys; from fmnist_ext.op import _library as l; sys.exit(0 if l.build_info().WITH_CUDA else 1)'; then
    export FMNIST_REQUIRE_CUDA_BUILD=1
  fi
else
  # One build folder per torch: a build against another torch must not reuse it.
  build_dir="build/torch-$torch_version"
  if [ -n "${FMNIST_WHEEL_OUT:-}" ]; then
    mkdir -p "$FMNIST_WHEEL_OUT"
    rm -f "$FMNIST_WHEEL_OUT"/fmnist_ext-*.whl
    "$py" -m pip wheel -q --no-build-isolation --no-deps -C build-dir="$build_dir" -w "$FMNIST_WHEEL_OUT" .
    install_wheel "$(cd "$FMNIST_WHEEL_OUT" && pwd)/$(cd "$FMNIST_WHEEL_OUT" && ls fmnist_ext-*.whl)"
  else
    "$py" -m pip install -q --no-build-isolation -C build-dir="$build_dir" ".[test]"
  fi
fi

# With no test files named, pytest collects the current folder (tests/).
# Run from tests/ so that `import fmnist_ext` finds the installed package (with
# its compiled library), not the source folder.
cd tests
"$py" -m fmnist_ext.info
FMNIST_REQUIRE_COMPILED=1 "$py" -m pytest -c "$root/pyproject.toml" --rootdir "$root" -p no:cacheprovider -ra "$@"
