#!/usr/bin/env bash
# Formats the C++/CUDA sources (csrc/ and tests/cuda_emulation/) with the
# repository's .clang-format, or checks them.
#
#   scripts/format_cpp.sh           rewrite every file in place
#   scripts/format_cpp.sh --check   change nothing; list the files that differ
#                                   from the format and exit 1 if any does
#
# Needs clang-format 19.1.7 (`pip install clang-format==19.1.7`): other
# versions format some constructs differently, so the version is pinned and
# checked. It is looked up as $CLANG_FORMAT, then in the active venv, then in
# $FMNIST_VENV (default .venv, as scripts/test.sh), then on PATH. Exit 2 when
# it is missing, another version, or fails.
set -euo pipefail
cd "$(dirname "$0")/.."

WANT_VERSION="19.1.7"
mode=format
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "format_cpp.sh: unknown argument '$1' (expected --check or nothing)" >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then
  echo "format_cpp.sh: too many arguments (expected --check or nothing)" >&2
  exit 2
fi

cf="${CLANG_FORMAT:-}"
if [ -z "$cf" ]; then
  for cand in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/clang-format}" "${FMNIST_VENV:-.venv}/bin/clang-format" \
              "$(command -v clang-format || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then cf="$cand"; break; fi
  done
fi
if [ -z "$cf" ] || ! [ -x "$(command -v "$cf" || true)" ]; then
  echo "format_cpp.sh: clang-format not found; install it with" \
       "'pip install clang-format==$WANT_VERSION' or set CLANG_FORMAT" >&2
  exit 2
fi
version="$("$cf" --version | sed -n 's/.*clang-format version \([0-9.]*\).*/\1/p')"
if [ "$version" != "$WANT_VERSION" ]; then
  echo "format_cpp.sh: $cf is clang-format '${version:-unknown}', this repository's format" \
       "needs $WANT_VERSION (pip install clang-format==$WANT_VERSION)" >&2
  exit 2
fi

mapfile -t files < <(find csrc tests/cuda_emulation -type f \
  \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) | LC_ALL=C sort)
if [ "${#files[@]}" -eq 0 ]; then
  echo "format_cpp.sh: no C++/CUDA sources found under csrc/ or tests/cuda_emulation/" >&2
  exit 2
fi

style="--style=file:$PWD/.clang-format"
if [ "$mode" = format ]; then
  if ! "$cf" "$style" -i "${files[@]}"; then
    echo "format_cpp.sh: $cf failed" >&2
    exit 2
  fi
  echo "formatted ${#files[@]} files"
  exit 0
fi

tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
bad=()
for f in "${files[@]}"; do
  if ! "$cf" "$style" "$f" >"$tmp"; then
    echo "format_cpp.sh: $cf failed on $f" >&2
    exit 2
  fi
  if ! cmp -s "$tmp" "$f"; then bad+=("$f"); fi
done
if [ "${#bad[@]}" -gt 0 ]; then
  echo "format_cpp.sh: ${#bad[@]} file(s) differ from .clang-format (run scripts/format_cpp.sh):" >&2
  printf '  %s\n' "${bad[@]}" >&2
  exit 1
fi
echo "format_cpp.sh: ${#files[@]} files formatted as .clang-format says"
