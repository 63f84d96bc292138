#!/usr/bin/env bash
# CI (no GPU needed): build the CUDA kernels against the CUDA build of torch
# that pip installs, and check that both ops have a kernel registered for the
# CUDA dispatch key, so a change that breaks CUDA compilation cannot land.
#
#   scripts/ci_cuda_build.sh [VENV_DIR]     (default: a fresh temporary dir)
#
# Needs python3 (3.10+), nvcc (CUDA_HOME, default /usr/local/cuda) and access
# to the package registry that pip is configured with. Exits non-zero on any
# failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-}"
if [[ -z "$VENV" ]]; then
  VENV="$(mktemp -d)/venv-cuda"
fi
case "$VENV" in
  /*) ;;
  *) VENV="$PWD/$VENV" ;;  # the script changes directory below
esac
TORCH_SPEC="${FMNIST_CI_TORCH:-torch==2.15.0}"
export PIP_CONSTRAINT="${PIP_CONSTRAINT-/dev/null}"  # the newest torch may lie past a machine's pip constraint
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

step() { echo; echo "=== ci_cuda_build: $* ==="; }

step "nvcc"
if [[ ! -x "$CUDA_HOME/bin/nvcc" ]] && ! command -v nvcc >/dev/null; then
  echo "nvcc not found (CUDA_HOME=$CUDA_HOME); cannot build the CUDA kernels" >&2
  exit 1
fi
"${CUDA_HOME}/bin/nvcc" --version 2>/dev/null | tail -1 || nvcc --version | tail -1

step "venv $VENV with $TORCH_SPEC"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet "$TORCH_SPEC" "scikit-build-core>=0.10" cmake ninja pytest hypothesis expecttest numpy
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.version.cuda, "this torch has no CUDA; CI must install a CUDA build of torch"
PYEOF

step "build with FMNIST_CUDA=ON"
cd "$ROOT"
LOG="$(mktemp)"
set +e
FMNIST_CUDA=ON "$PY" -m pip install --no-build-isolation -v -C build-dir=build/cuda . >"$LOG" 2>&1
rc=$?
set -e
grep -E "fmnist_ext:" "$LOG" || true
if [[ $rc -ne 0 ]]; then
  tail -80 "$LOG" >&2
  echo "ci_cuda_build: the CUDA build failed (full log: $LOG)" >&2
  exit "$rc"
fi

step "CUDA kernels registered"
cd "$(mktemp -d)"  # import the installed package, not the source tree
"$PY" - <<'PYEOF'
import torch
import fmnist_ext
from fmnist_ext.op import _library
_build_info = _library.build_info()
assert _library.LOADED, _library.NOT_LOADED_REASON
assert _build_info.WITH_CUDA, "the build did not compile the CUDA kernels"
for op in (_library.FORWARD_OP, _library.BACKWARD_OP):
    assert _library.has_kernel(op, "CUDA"), f"{op}: no CUDA kernel"
    print(f"{op}: CUDA kernel registered")
print("architectures:", _build_info.CUDA_ARCHITECTURES)
PYEOF
"$PY" -m fmnist_ext.info

step "tests/op/test_cuda.py (GPU tests skip without a device)"
"$PY" -m pytest -q -rs "$ROOT/tests/op/test_cuda.py" -p no:cacheprovider
echo "ci_cuda_build: OK"
