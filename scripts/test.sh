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
# Environment: TORCH_SPEC (default "torch>=2.11"; CI runs torch==2.13.0, the
# CPU build, torch==2.15.0 and torch==2.11.0), FMNIST_VENV (default .venv;
# ignored when a venv is active); the build's own options (FMNIST_CUDA,
# FMNIST_WERROR: see CMakeLists.txt) pass through.
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
# One build folder per torch: a build against another torch must not reuse it.
torch_version=$("$py" -c 'import torch; print(torch.__version__)')
"$py" -m pip install -q --no-build-isolation -C build-dir="build/torch-$torch_version" ".[test]"

# With no test files named, pytest collects the current folder (tests/).
# Run from tests/ so that `import fmnist_ext` finds the installed package (with
# its compiled library), not the source folder.
cd tests
"$py" -m fmnist_ext.info
FMNIST_REQUIRE_COMPILED=1 "$py" -m pytest -c "$root/pyproject.toml" --rootdir "$root" -p no:cacheprovider -ra "$@"
