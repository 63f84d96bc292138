"""Evidence that the execution harness catches real kernel bugs.

Applies one mutation at a time to a temporary copy of csrc/ (deleting each
single __syncthreads() of the kernels, allocating grad_weight or grad_bias
with empty instead of zeros, launching with less shared memory or fewer
blocks than planned, skipping a contiguity copy, ignoring output_mask,
summing grad_weight in block order as the atomics before the fix did, the
old winner-index rule, the old SM-count cache, the dense grad_weight's D
without the winner's column test, the winner patches' filters shifted the
wrong way, a pool row dropped or a non-finite gradient spread,
and the boundary mutations: each bound at the end of a batch, chunk, slice
set, pool row or band loosened by one, the zeros past the winners' reach or
the dense grad_weight's bias lanes cut short, its sliding window one column
off, the dense grad_weight's persistent loop cut to one chunk,
reduce_partials' row ranges or tree off by one, a plan that drops a partly
filled last block or chunk, and the tiled forward's bounds, row, column,
channel-group and image-stride mutations), runs
the harness tests of tests/op/test_cuda.py against the copy, and reports whether
they failed, as they must. Not part of CI (each mutation rebuilds the harness:
half a minute to 4 minutes per mutation on a busy 2-core machine, about an
hour for all 63).

    cd tests && ../.venv/bin/python cuda_emulation/mutation_check.py [--only SUBSTRING] [--exclude SUBSTRING]

Exit status 0 when every mutation was caught.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = "cuda/kernels_global.cuh"
BODY = "cuda/op_body.h"


def sync_mutations():
    text = (ROOT / "csrc" / KERNELS).read_text()
    spots = [m.start() for m in re.finditer(r"__syncthreads\(\);", text)]
    out = []
    for k, pos in enumerate(spots):
        line = text.count("\n", 0, pos) + 1
        out.append(
            (
                f"delete __syncthreads() #{k + 1} ({KERNELS}:{line})",
                [(KERNELS, lambda t, pos=pos: t[:pos] + t[pos + len("__syncthreads();") :])],
                "tsan",
            )
        )
    return out


def replace_once(old, new):
    def f(t):
        assert t.count(old) == 1, f"mutation target not unique: {old!r}"
        return t.replace(old, new)

    return f


def in_forward_op(old, new, count):
    """Replaces `old` inside forward_op only (its `count` occurrences), so the
    mutation does not depend on how the formatter broke the lines."""

    def f(t):
        start, end = t.index("forward_op("), t.index("backward_op(")
        body = t[start:end]
        assert body.count(old) == count, f"expected {count} of {old!r} in forward_op"
        return t[:start] + body.replace(old, new) + t[end:]

    return f


def in_function(signature, old, new):
    """Replaces the one `old` inside the function that starts at `signature`
    (up to its closing brace in column 0)."""

    def f(t):
        start = t.index(signature)
        end = t.index("\n}\n", start)
        body = t[start:end]
        assert body.count(old) == 1, f"expected one {old!r} in {signature!r}"
        return t[:start] + body.replace(old, new) + t[end:]

    return f


# The block phases, in four parts (csrc/cuda/kernels.cuh lists them): a mutation
# aimed at KCUH applies to the one part that holds its target.
KCUH = (
    "cuda/kernels_common.cuh",
    "cuda/kernels_forward.cuh",
    "cuda/kernels_backward_input.cuh",
    "cuda/kernels_backward_weight.cuh",
)
PLAN = "cuda/plan.h"
# Bounds loosened (or tightened) by one: an image, a slice, a row or a chunk
# past the end of the batch is read or written, or the last one is dropped.
# They only show on cases whose last block or chunk is partly filled (the
# harness's PLAN_COVERAGE): ASan (exact-size buffers) or the values.
BOUNDARY_MUTATIONS = [
    (f"boundary: {what}", [(path, in_function(sig, old, new))], "asan")
    for what, path, sig, old, new in [
        (
            "grad_weight staging reads one image past the batch",
            KCUH,
            "FMNIST_HD void bwd_weight_stage(",
            "if (n < g.n) {",
            "if (n <= g.n) {",
        ),
        (
            "image staging reads one image past the batch",
            KCUH,
            "FMNIST_HD void stage_images(",
            "if (n < g.n && y",
            "if (n <= g.n && y",
        ),
        (
            "grad_input staging reads one image past the batch",
            KCUH,
            "FMNIST_HD void bwd_input_stage(",
            "if (n < g.n) {",
            "if (n <= g.n) {",
        ),
        (
            "patch grad_input staging reads one image past the batch",
            KCUH,
            "FMNIST_HD void bwd_patch_stage(",
            "if (n0 + img < g.n) {",
            "if (n0 + img <= g.n) {",
        ),
        (
            "patch grad_input writes one image past the batch",
            KCUH,
            "FMNIST_HD void bwd_patch_work(",
            "if (n >= g.n) continue;",
            "if (n > g.n) continue;",
        ),
        (
            "patch grad_input reads one pool row past the pooled output",
            KCUH,
            "FMNIST_HD void bwd_patch_work(",
            "if (oph < 0 || oph >= g.ph) continue;",
            "if (oph < 0 || oph > g.ph) continue;",
        ),
        (
            "patch grad_input leaves the last column past the patches' reach unwritten",
            KCUH,
            "FMNIST_HD void bwd_patch_work(",
            "x < g.w; ++x) out[y * g.w + x] = T(0);",
            "x < g.w - 1; ++x) out[y * g.w + x] = T(0);",
        ),
        (
            "patch grad_input plan drops a partly filled last block",
            PLAN,
            "inline BwdInputPlan plan_backward_input(",
            "p.blocks = ceil_div(g.n, int64_t(kPatchImgs));",
            "p.blocks = g.n / kPatchImgs;",
        ),
        (
            "dense grad_weight staging reads one image past the batch",
            KCUH,
            "FMNIST_HD void wdense_stage(",
            "if (n < g.n && co < C",
            "if (n <= g.n && co < C",
        ),
        (
            "dense grad_weight image staging reads one image past the batch",
            KCUH,
            "FMNIST_HD void wdense_stage(",
            "if (n < g.n && y >= 0",
            "if (n <= g.n && y >= 0",
        ),
        (
            "dense grad_weight accumulates one image past the chunk",
            KCUH,
            "FMNIST_HD void wdense_accumulate(",
            "img < a.imgs;",
            "img <= a.imgs;",
        ),
        (
            "dense grad_weight stores one bias channel too few",
            KCUH,
            "FMNIST_HD void wdense_store(",
            "if (c < C) row",
            "if (c < C - 1) row",
        ),
        (
            "dense grad_weight's sliding window starts one column off",
            KCUH,
            "FMNIST_HD void wdense_accumulate(",
            "load_vec(xrow + t * a.xcols, xv);",
            "load_vec(xrow + t * a.xcols + 1, xv);",
        ),
        (
            "dense grad_weight's band runs one row into the next band",
            KCUH,
            "FMNIST_HD void wdense_accumulate(",
            "imin(bh, g.ph * g.pool - L.band * bh)",
            "imin(bh + 1, g.ph * g.pool - L.band * bh)",
        ),
        (
            "dense grad_weight stages D's last band row as zeros",
            KCUH,
            "FMNIST_HD void wdense_stage(",
            "t < bh && py < gh",
            "t < bh - 1 && py < gh",
        ),
        (
            "dense grad_weight plan drops a partly filled last chunk",
            PLAN,
            "inline BwdWeightPlan plan_backward_weight(",
            "p.chunks = ceil_div(g.n, int64_t(p.imgs));",
            "p.chunks = g.n / p.imgs;",
        ),
        (
            "dense grad_weight: each block runs one chunk (no persistent loop)",
            KERNELS,
            "conv_relu_maxpool2d_backward_weight_dense_kernel(",
            "chunk += gridDim.x) {",
            "chunk += a.chunks) {",
        ),
        (
            "grad_input writes one image past the batch",
            KCUH,
            "FMNIST_HD void bwd_input_work(",
            "if (n >= g.n) continue;",
            "if (n > g.n) continue;",
        ),
        (
            "forward writes one image past the batch",
            KCUH,
            "FMNIST_HD void fwd_work(",
            "if (n >= g.n) continue;",
            "if (n > g.n) continue;",
        ),
        (
            "grad_weight accumulates one image past the chunk",
            KCUH,
            "FMNIST_HD void bwd_weight_accumulate(",
            "img < a.imgs;",
            "img <= a.imgs;",
        ),
        (
            "grad_weight flush adds one slice too many",
            KCUH,
            "FMNIST_HD void bwd_weight_flush(",
            "sl < a.slices;",
            "sl <= a.slices;",
        ),
        (
            "reduce_partials adds one row past its part's range",
            KCUH,
            "FMNIST_HD void reduce_partials_range(",
            "r < rows * (p + 1) / kReduceParts;",
            "r <= rows * (p + 1) / kReduceParts;",
        ),
        (
            "reduce_partials skips the first row of its part's range",
            KCUH,
            "FMNIST_HD void reduce_partials_range(",
            "r = rows * p / kReduceParts;",
            "r = rows * p / kReduceParts + 1;",
        ),
        (
            "reduce_partials tree skips its last level",
            KCUH,
            "FMNIST_HD void reduce_partials_tree(",
            "h < kReduceParts; h *= 2)",
            "h < kReduceParts / 2; h *= 2)",
        ),
        (
            "reduce_partials tree adds the neighbour part one off",
            KCUH,
            "FMNIST_HD void reduce_partials_tree(",
            "s[p] += s[p + h];",
            "s[p] += s[p + h - 1];",
        ),
        (
            "grad_input visits one pool row past the pooled output",
            KCUH,
            "FMNIST_HD void bwd_input_work(",
            "imin(g.ph - 1, last_cell_reaching(yp, g.pool))",
            "imin(g.ph, last_cell_reaching(yp, g.pool))",
        ),
        (
            "grad_weight direct path reads one image past the batch",
            KCUH,
            "FMNIST_HD void bwd_weight_direct_item(",
            "n < g.n;",
            "n <= g.n;",
        ),
        (
            "forward direct kernel writes one output past the end",
            KERNELS,
            "conv_relu_maxpool2d_forward_direct_kernel(",
            "o < total;",
            "o <= total;",
        ),
        (
            "forward plan drops a partly filled last block",
            PLAN,
            "inline FwdPlan plan_forward(",
            "p.blocks = ceil_div(g.n, imgs);",
            "p.blocks = g.n / imgs;",
        ),
        (
            "grad_input plan drops a partly filled last block",
            PLAN,
            "inline BwdInputPlan plan_backward_input(",
            "p.blocks = ceil_div(g.n, imgs);",
            "p.blocks = g.n / imgs;",
        ),
        (
            "grad_weight plan drops a partly filled last chunk",
            PLAN,
            "inline BwdWeightPlan plan_backward_weight(",
            "p.chunks = ceil_div(g.n, imgs);",
            "p.chunks = g.n / imgs;",
        ),
    ]
]

# The tiled forward (both blocks of the model): each mutation breaks one
# thing its comment promises; the values or ASan must show it.
TILED_MUTATIONS = [
    (f"tiled forward: {what}", [(path, in_function(sig, old, new))], "asan")
    for what, path, sig, old, new in [
        (
            "writes one image past the batch",
            KCUH,
            "FMNIST_HD void fwd_tiled_work(",
            "if (n >= g.n) continue;",
            "if (n > g.n) continue;",
        ),
        (
            "the last filter row dropped",
            KCUH,
            "FMNIST_HD void fwd_tiled_work(",
            "r <= g.kh;",
            "r < g.kh;",
        ),
        (
            "row segment one column off",
            KCUH,
            "FMNIST_HD void fwd_tiled_work(",
            "2 * kTileCells * seg;",
            "2 * kTileCells * seg + 1;",
        ),
        (
            "weights of the partly filled channel group read past cout",
            KCUH,
            "FMNIST_HD void fwd_tiled_stage(",
            "co < g.cout ? a.weight[",
            "co <= g.cout + 1 ? a.weight[",
        ),
        (
            "image stride one row short (images overlap)",
            PLAN,
            "inline void tiled_strides(",
            "ximg = g.cin * staged_rows(g) * xcols;",
            "ximg = g.cin * staged_rows(g) * xcols - xcols;",
        ),
    ]
]


MUTATIONS = [
    *sync_mutations(),
    (
        "grad_weight/grad_bias with empty instead of zeros",
        [(BODY, replace_once("empty_sum ? be.template zeros<T>(sizes)", "empty_sum ? be.template empty<T>(sizes)"))],
        "asan",
    ),
    (
        "forward: 16 bytes less shared memory than planned",
        [(BODY, in_forward_op("plan.smem", "plan.smem - 16", count=3))],
        "asan",
    ),
    (
        "grad_weight: one block fewer than planned",
        [
            (
                BODY,
                replace_once(
                    "dim3(grid_x(be, plan.blocks)), plan.threads, plan.smem, a);",
                    "dim3(grid_x(be, plan.blocks > 1 ? plan.blocks - 1 : 1)), plan.threads, plan.smem, a);",
                ),
            )
        ],
        "asan",
    ),
    (
        "forward: input not made contiguous",
        [(BODY, replace_once("const Tensor x = be.contiguous(input);", "const Tensor x = input;"))],
        "asan",
    ),
    (
        "backward: output_mask[2] ignored (grad_bias always written)",
        [
            (
                BODY,
                replace_once(
                    "output_mask[2] ? be.template ptr<T>(grad_bias) : nullptr", "be.template ptr<T>(grad_bias)"
                ),
            )
        ],
        "asan",
    ),
    # The design before the fix: every block adds its sums into one zeroed
    # row, in whatever order the blocks run (atomicAdd on the GPU).
    (
        "grad_weight summed in block order (the old atomics)",
        [
            (
                BODY,
                replace_once(
                    "Tensor partials = be.template empty<acc_t>({rows * ne});",
                    "Tensor partials = be.template zeros<acc_t>({rows * ne});",
                ),
            ),
            (BODY, replace_once(", a, rows);", ", a, plan.fast ? 1 : rows);")),
            (KCUH, replace_once("acc_t* row = a.partials + bx * ne;", "acc_t* row = a.partials;")),
            (KCUH, replace_once("    row[e] = sum;", "    row[e] += sum;")),
        ],
        "asan",
    ),
    # The winner patches: a copy shifted the wrong way, or the band's top
    # pool row dropped (its patch rows reach into the band from above).
    (
        "patch grad_input: filters shifted by (dx, dy) instead of (dy, dx)",
        [(KCUH, replace_once("const int i = p - v / 2, j = c - v % 2;", "const int i = p - v % 2, j = c - v / 2;"))],
        "asan",
    ),
    (
        "patch grad_input: copies staged with the old 8-wide row pitch",
        [(KCUH, replace_once("kPatchVar + p * kPatch + c] = val;", "kPatchVar + p * 8 + c] = val;"))],
        "asan",
    ),
    (
        "patch grad_input: only every other group of 4 flags read",
        [(KCUH, replace_once("for (int t = 0; t < nthreads; t += 4) {", "for (int t = 0; t < nthreads; t += 8) {"))],
        "asan",
    ),
    (
        "patch grad_input: a non-finite g spread over the copies' zeros (flags ignored)",
        [(KCUH, replace_once("slow = slow || f[0] + f[1] + f[2] + f[3] != 0.0f;", "slow = false;"))],
        "asan",
    ),
    (
        "dense grad_weight's D places a winner's gradient without checking its column",
        [
            (
                KCUH,
                replace_once(
                    " &&\n                      winner_row(oph, j, g.pool) == py && winner_col(opw, j, g.pool) == px;",
                    " &&\n                      winner_row(oph, j, g.pool) == py;",
                ),
            )
        ],
        "asan",
    ),
    (
        "patch grad_input: the pool row two above the band dropped",
        [(KCUH, replace_once("for (int k = -2; k <= 2; ++k) {", "for (int k = -1; k <= 2; ++k) {"))],
        "asan",
    ),
    # The rule before the fix: only the marker pool*pool meant "no gradient".
    (
        "winner index checked against the marker only (old rule)",
        [
            (
                "index_math.h",
                replace_once(
                    "return static_cast<uint32_t>(j) < static_cast<uint32_t>(no_grad);", "return j != no_grad;"
                ),
            )
        ],
        "asan",
    ),
    (
        "SM-count cache as a plain static array (old)",
        [
            (
                "cuda/sm_count.h",
                lambda t: t.replace(
                    "static std::atomic<int> cache[kMaxCachedDevices];", "static int cache[kMaxCachedDevices];"
                )
                .replace("cache[device].load(std::memory_order_relaxed)", "cache[device]")
                .replace("cache[device].store(n, std::memory_order_relaxed);", "cache[device] = n;"),
            )
        ],
        "tsan",
    ),
    *BOUNDARY_MUTATIONS,
    *TILED_MUTATIONS,
]


def run_one(name, edits, sanitizer):
    with tempfile.TemporaryDirectory() as tmp:
        csrc = Path(tmp) / "csrc"
        shutil.copytree(ROOT / "csrc", csrc)
        for rel, mutate in edits:
            for one in rel if isinstance(rel, tuple) else (rel,):
                path = csrc / one
                try:
                    path.write_text(mutate(path.read_text()))
                    break
                except (AssertionError, ValueError):  # not in this part
                    continue
            else:
                raise AssertionError(f"{name}: the mutation's target is in none of {rel}")
        env = dict(os.environ, FMNIST_HARNESS_CSRC=str(csrc), FMNIST_HARNESS_SANITIZERS=sanitizer)
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(ROOT),
            "-p",
            "no:cacheprovider",
            "-x",
            "-q",
            "op/test_cuda.py",
            "-k",
            "harness",
        ]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT / "tests", env=env, capture_output=True, text=True)
        caught = r.returncode != 0
        # The most telling line: a sanitizer report, else the first assertion.
        lines = r.stdout.splitlines()
        why = next(
            (
                ln.strip()
                for key in (
                    "ThreadSanitizer: data race",
                    "AddressSanitizer:",
                    "runtime error:",
                    "E   AssertionError:",
                    "E       AssertionError:",
                )
                for ln in lines
                if key in ln
            ),
            next((ln for ln in lines if ln.startswith("E ") and ln[1:].strip()), ""),
        )
        why = why.lstrip("E ").strip()[:160]
        print(
            f"{'CAUGHT' if caught else 'MISSED'}  {time.time() - t0:5.0f}s  [{sanitizer}] {name}"
            + (f"\n        {why}" if why else ""),
            flush=True,
        )
        return caught


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the mutations whose name contains this")
    ap.add_argument("--exclude", help="skip the mutations whose name contains this")
    args = ap.parse_args()
    todo = [
        m for m in MUTATIONS if (not args.only or args.only in m[0]) and not (args.exclude and args.exclude in m[0])
    ]
    missed = [m[0] for m in todo if not run_one(*m)]
    print(f"{len(todo) - len(missed)}/{len(todo)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
