#!/usr/bin/env bash
# The GPU check: one command for a fresh GPU machine without network whose
# python3 already has torch with CUDA, scikit-build-core, pybind11, ninja,
# cmake, pytest and numpy.
#
#   scripts/gpu_check.sh OUTDIR
#
# Builds and installs the project (--no-build-isolation --no-deps, CUDA
# forced on, for the GPU's own architecture), prints `python -m
# fmnist_ext.info` and `python -m fmnist_ext.info --check` (the fused op
# against stock on this GPU), runs tests/test_cuda.py and the cuda cases of the
# rest of the suite (the op tests run for every device), the benchmark on the GPU (python/benchmark.py: both seed
# blocks, fused vs cuDNN stock vs torch.compile, batch 1/64/1000/10000,
# forward and forward+backward; then its whole-model section's quick form on
# the GPU, the training step and epoch of stock and fused, each in its own
# process, into bench.log), a 2-epoch training run, and, when
# compute-sanitizer is on PATH or under $CUDA_HOME/bin, a small CUDA test
# selection under memcheck and racecheck.
#
# Every step has its own timeout and the whole run stays under 8 minutes (a
# step that would not fit in what is left is not started and counts as
# failed). The script keeps going after a failed step and exits non-zero if
# any step failed. OUTDIR stays flat, at most 8 files:
#   build.log  tests.log  sanitizer.log  bench.log  train.log
#   gpu_check.json (pass/fail/skipped, seconds and exit code per step)
#   bench_cuda.json  bench_cuda.png  (written by the benchmark)
set -uo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$PATH:$CUDA_HOME/bin"
export PIP_BREAK_SYSTEM_PACKAGES=1  # a machine-wide python3 is fine here
export PIP_NO_INDEX=1               # no network: never try a registry
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-8}"

START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-465}))
STEPS="$(mktemp)"
WORK="$(mktemp -d)"  # scratch outside OUTDIR (pytest cwd, training output)
: >"$STEPS"

# run_step NAME MAX_SECONDS LOGFILE CMD...: appends to LOGFILE (in OUTDIR).
run_step() {
  local name="$1" max_s="$2" log="$OUT/$3"
  shift 3
  local now left t0 rc status
  now=$(date +%s)
  left=$((DEADLINE - now - 5))
  if ((left < 20)); then
    echo "=== $name: NOT STARTED (out of the 8-minute budget) ===" >>"$log"
    printf '%s\tfail\t0\t-1\t%s\tnot started: out of time\n' "$name" "$(basename "$log")" >>"$STEPS"
    echo "[gpu_check] $name: not started (out of time)"
    return 1
  fi
  ((max_s > left)) && max_s=$left
  echo "=== $name (timeout ${max_s}s): $* ===" >>"$log"
  echo "[gpu_check] $name (timeout ${max_s}s) ..."
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$max_s" "$@" >>"$log" 2>&1
  rc=$?
  local secs
  secs=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")
  if [[ $rc -eq 0 ]]; then status=pass; else status=fail; fi
  local note=""
  [[ $rc -eq 124 || $rc -eq 137 ]] && note="timed out after ${max_s}s"
  echo "=== $name: $status (rc=$rc, ${secs}s) $note ===" >>"$log"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$rc" "$(basename "$log")" "$note" >>"$STEPS"
  echo "[gpu_check] $name: $status (${secs}s)"
  return $rc
}

skip_step() {  # skip_step NAME LOGFILE REASON
  echo "=== $1: SKIPPED ($3) ===" >>"$OUT/$2"
  printf '%s\tskipped\t0\t0\t%s\t%s\n' "$1" "$2" "$3" >>"$STEPS"
  echo "[gpu_check] $1: skipped ($3)"
}

# ---- environment -----------------------------------------------------------
{
  echo "gpu_check started $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT"
  git -C "$ROOT" log -1 --oneline 2>/dev/null || true
  nvidia-smi 2>&1 | head -15 || true
  "$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -2 || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} >"$OUT/build.log" 2>&1
ARCH="$("$PY" -c "import torch; c = torch.cuda.get_device_capability(0); print(f'{c[0]}.{c[1]}')" 2>/dev/null)"
# Only the GPU's own architecture (a faster build); override with TORCH_CUDA_ARCH_LIST.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0}}"
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" >>"$OUT/build.log"

# ---- a GPU must be visible (otherwise every GPU test would merely skip) ------
run_step gpu_visible 60 build.log "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.cuda.get_device_name(0))"

# ---- build -------------------------------------------------------------------
run_step build 300 build.log env FMNIST_CUDA=ON \
  "$PY" -m pip install --no-build-isolation --no-deps -v -C build-dir=build/gpu-check "$ROOT"
(cd "$WORK" && run_step info 60 build.log "$PY" -m fmnist_ext.info)
# The fused op against the stock sequence on every device (cpu and this GPU):
# forward and all gradients, float32 and float64; non-zero on any mismatch.
(cd "$WORK" && run_step info_check 120 build.log "$PY" -m fmnist_ext.info --check)

# ---- tests (from a scratch dir, so the installed package is imported) -------
# (The CPU execution harness of the kernels runs in CI, not here: it needs no
# GPU and its sanitizer builds take minutes.)
(cd "$WORK" && run_step test_cuda 120 tests.log \
  "$PY" -m pytest -rs -q -p no:cacheprovider "$ROOT/tests/test_cuda.py" -k "not harness")

# ---- benchmark -----------------------------------------------------------------
if [[ -f "$ROOT/python/benchmark.py" ]]; then
  # The per-block rows here; the whole-model section (minutes in full) in its quick form below.
  run_step bench 150 bench.log "$PY" "$ROOT/python/benchmark.py" --device cuda --no-model \
    --batch-sizes 1,64,1000,10000 --json "$OUT/bench_cuda.json" --png "$OUT/bench_cuda.png"
  (cd "$WORK" && run_step bench_model 90 bench.log "$PY" -m fmnist_ext.benchmark.model --device cuda --quick)
else
  skip_step bench bench.log "python/benchmark.py is absent"
fi

# ---- short training -------------------------------------------------------------
if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('fmnist_ext.train') else 1)" 2>/dev/null; then
  TRAIN_ARGS=(--device cuda --epochs 2 --out "$WORK/train")
  if [[ -d "$ROOT/.data" ]]; then
    TRAIN_ARGS+=(--data-dir "$ROOT/.data")
  fi
  (cd "$ROOT" && run_step train 120 train.log "$PY" -m fmnist_ext.train "${TRAIN_ARGS[@]}")
  # OUTDIR stays flat: list the training outputs and append the small text ones.
  if [[ -d "$WORK/train" ]]; then
    {
      echo "=== training outputs (left in $WORK/train) ==="
      find "$WORK/train" -maxdepth 2 -type f -printf '%P %s bytes\n'
      find "$WORK/train" -maxdepth 2 -type f \( -name '*.json' -o -name '*.csv' -o -name '*.txt' -o -name '*.log' \) \
        -size -200k -exec sh -c 'echo "--- $1"; cat "$1"' _ {} \;
    } >>"$OUT/train.log" 2>&1
  fi
else
  skip_step train train.log "fmnist_ext.train is absent"
fi

# ---- the rest of the suite's CUDA cases (the op tests' `device` parameter) -------
(cd "$WORK" && run_step suite_cuda 240 tests.log bash -c '
  "$0" -m pytest -rs -q -p no:cacheprovider "$1/tests" --ignore="$1/tests/test_cuda.py" -k "cuda or gpu"
  rc=$?; [ $rc -eq 5 ] && { echo "(no other CUDA tests collected)"; exit 0; }; exit $rc' "$PY" "$ROOT")

# ---- compute-sanitizer ---------------------------------------------------------------
SAN="$(command -v compute-sanitizer || true)"
[[ -z "$SAN" && -x "$CUDA_HOME/bin/compute-sanitizer" ]] && SAN="$CUDA_HOME/bin/compute-sanitizer"
if [[ -n "$SAN" ]]; then
  SEL_MEM="test_nan_and_ties or test_only_requested_gradients or test_non_contiguous or test_cuda_equals_cpu_kernels_float64"
  SEL_RACE="test_nan_and_ties or test_only_requested_gradients"
  (cd "$WORK" && run_step memcheck 120 sanitizer.log "$SAN" --tool memcheck --error-exitcode 1 \
    --target-processes all "$PY" -m pytest -q -x -p no:cacheprovider -m cuda "$ROOT/tests/test_cuda.py" "$ROOT/tests/test_op.py" -k "$SEL_MEM")
  (cd "$WORK" && run_step racecheck 90 sanitizer.log "$SAN" --tool racecheck --error-exitcode 1 \
    --target-processes all "$PY" -m pytest -q -x -p no:cacheprovider -m cuda "$ROOT/tests/test_cuda.py" "$ROOT/tests/test_op.py" -k "$SEL_RACE")
else
  skip_step sanitizer sanitizer.log "compute-sanitizer not found on PATH or in $CUDA_HOME/bin"
fi

# ---- summary -------------------------------------------------------------------------
"$PY" - "$STEPS" "$OUT/gpu_check.json" "$START" <<'PYEOF'
import json, sys, time
steps_file, out, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
steps = []
for line in open(steps_file):
    name, status, secs, rc, log, note = (line.rstrip("\n").split("\t") + [""] * 6)[:6]
    steps.append({"step": name, "status": status, "seconds": float(secs), "rc": int(rc),
                  "log": log, "note": note})
info = {}
try:
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
except Exception as exc:  # pragma: no cover
    info = {"torch_error": str(exc)}
summary = {
    "ok": all(s["status"] != "fail" for s in steps),
    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
    "total_seconds": round(time.time() - start, 1),
    **info,
    "steps": steps,
}
json.dump(summary, open(out, "w"), indent=2)
print(json.dumps({k: summary[k] for k in ("ok", "total_seconds")}),
      " ".join(f"{s['step']}={s['status']}" for s in steps))
sys.exit(0 if summary["ok"] else 1)
PYEOF
rc=$?
rm -f "$STEPS"
echo "[gpu_check] logs and figures in $OUT ($(ls "$OUT" | wc -l) files)"
exit $rc
