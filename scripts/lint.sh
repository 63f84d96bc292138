#!/usr/bin/env bash
# Lint and format checks (CI runs this; a finding fails CI):
#   ruff check           Python lint (rules in pyproject.toml [tool.ruff.lint])
#   ruff format --check  Python formatting
#   scripts/format_cpp.sh --check   C++/CUDA formatting (.clang-format)
# The tool versions are pinned so a formatter release cannot fail CI on
# unchanged code. To fix findings: `ruff check --fix .`, `ruff format .`,
# `bash scripts/format_cpp.sh`.
#
#   bash scripts/lint.sh          (FMNIST_VENV: the venv to use, default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."

RUFF_SPEC="ruff==0.14.0"
CLANG_FORMAT_SPEC="clang-format==19.1.7"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  venv=${FMNIST_VENV:-.venv}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  bin="$(pwd)/$venv/bin"
else
  bin="$VIRTUAL_ENV/bin"
fi
"$bin/python" -m pip install -q "$RUFF_SPEC" "$CLANG_FORMAT_SPEC"

status=0
echo "== ruff check =="
"$bin/ruff" check . || status=1
echo "== ruff format --check =="
"$bin/ruff" format --check . || status=1
echo "== clang-format --check =="
PATH="$bin:$PATH" bash scripts/format_cpp.sh --check || status=1
exit $status
