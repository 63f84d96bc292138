"""What only CUDA has: registration and build checks, the execution harness,
and the GPU checks with no CPU analogue. (Over 400 lines because the
harness test builds and checks its whole case grid in one place.)

Every behaviour the CPU and CUDA kernels share (forward and gradients against
stock, layouts, gradcheck, opcheck, torch.compile, autodiff modes, autocast,
bad inputs and indices, the inference form) is tested once, for every device,
in the other op test files (their `device` parameter, op_helpers.cpu_and_cuda).

Tests marked `gpu` need a CUDA device and the compiled CUDA kernels and are
skipped otherwise, with the reason. Without a GPU:
  * the CUDA kernels are registered whenever the build says it built them;
  * the execution harness (tests/cuda_emulation) compiles the real __global__
    kernels and the op's host code (csrc/cuda/op_body.h) with a host C++
    compiler, runs every CUDA thread of a block as a host thread under
    ThreadSanitizer and under AddressSanitizer+UBSan, and compares forward
    and all gradients with the CPU kernels (exactly) and the stock sequence;
  * CMake's CUDA version checks are fed fake versions.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from op_helpers import GRID, dyadic, float64_stock_on_device, requires_cuda_kernels, stock

import fmnist_ext
from fmnist_ext.op import _library

ROOT = Path(__file__).resolve().parents[2]


def gpu(test):
    """Needs a CUDA device and the compiled CUDA kernels (skipped with the reason); -m cuda selects it."""
    return pytest.mark.cuda(requires_cuda_kernels(test))


op = torch.ops.fmnist_ext.conv_relu_maxpool2d if _library.LOADED else None
bwd_op = torch.ops.fmnist_ext._conv_relu_maxpool2d_backward if _library.LOADED else None


def _build_info():
    return _library.build_info()


# --------------------------------------------------------------------------
# Without a GPU


def test_cuda_kernels_registered_when_built_with_cuda():
    info = _build_info()
    if info is None or not info.WITH_CUDA:
        pytest.skip("the extension was built without CUDA kernels")
    assert _library.LOADED, _library.NOT_LOADED_REASON
    for name in (_library.FORWARD_OP, _library.BACKWARD_OP):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
    assert info.CUDA_ARCHITECTURES


# --------------------------------------------------------------------------
# The real CUDA kernels on CPU threads (tests/cuda_emulation): no GPU needed,
# only a C++20 compiler with ThreadSanitizer / AddressSanitizer runtimes.

sys.path.insert(0, str(ROOT / "tests" / "cuda_emulation"))
import driver  # noqa: E402

# (name, input shape, weight shape, padding, pool, bias, dtypes, SM count the
# plans see). Small batches: every CUDA thread is a host thread under TSAN.
HARNESS_SHAPES = [
    ("seed1", (2, 1, 28, 28), (6, 1, 5, 5), (0, 0), 2, True, "fd", 2),
    ("seed2", (3, 6, 12, 12), (12, 6, 5, 5), (0, 0), 2, True, "fd", 2),
    # The plans of training batches on a big GPU, on a few images planned for
    # 1 SM (PLAN_COVERAGE checks each holds what its comment says):
    # forward (tiled): 8 images per block, the last block 1; grad_weight: 3
    # chunks of 8 images on 2 blocks (block 0 runs 2), the last chunk 1 image.
    ("seed2_multichunk", (17, 6, 12, 12), (12, 6, 5, 5), (0, 0), 2, True, "fd", 1),
    # grad_weight (dense, 6 bands per image): 7 chunks of 2 images on 4
    # blocks, the last chunk 1 image.
    ("seed1_multichunk", (13, 1, 28, 28), (6, 1, 5, 5), (0, 0), 2, True, "f", 1),
    # forward 16 images per block (last 3); grad_input 2 per block (last 1,
    # one channel per thread); grad_weight 12 batch slices over chunks of 32
    # images, 3 chunks on 2 blocks, the last chunk 3 images.
    ("slices", (67, 1, 10, 10), (2, 1, 3, 3), (0, 0), 2, True, "f", 1),
    # grad_input 2 images per block (last 1), 4 channels per thread.
    ("partial_cb4", (5, 6, 8, 8), (4, 6, 3, 3), (0, 0), 2, True, "f", 1),
    ("batch0", (0, 1, 28, 28), (6, 1, 5, 5), (0, 0), 2, True, "fd", 2),
    ("batch1", (1, 6, 12, 12), (12, 6, 5, 5), (0, 0), 2, True, "f", 2),
    ("odd", (3, 3, 13, 11), (5, 3, 3, 3), (0, 0), 2, True, "f", 2),
    ("padding", (2, 2, 9, 10), (4, 2, 3, 3), (1, 2), 2, True, "f", 2),
    ("rect_nobias", (2, 3, 10, 12), (7, 3, 2, 5), (1, 0), 2, False, "fd", 2),
    ("pool3", (2, 2, 11, 9), (3, 2, 4, 2), (0, 1), 3, True, "fd", 2),
    ("pool1", (3, 4, 8, 8), (5, 4, 3, 3), (1, 1), 1, True, "f", 2),
    ("pool16", (2, 2, 20, 19), (3, 2, 3, 2), (1, 1), 16, True, "fd", 2),  # int32 indices
    # grad_input from winner patches (pool 2, 5 x 5 filters, 4 pooled
    # columns): 2 blocks of 32 images, the last 11; 13 x 13: the last input
    # row and column are out of the patches' reach (zeros), 3 row bands, the
    # last one row.
    ("patch_tiles", (43, 6, 13, 13), (12, 6, 5, 5), (0, 0), 2, True, "f", 1),
    # The same in float64 (2 output channels: the staging fits), 8 images
    # short of a block; the tiled forward's channel group partly filled.
    ("patch_small", (24, 3, 13, 12), (2, 3, 5, 5), (0, 0), 2, True, "fd", 2),
    # forward (tiled) with padding, 4 filter rows, 2 column segments per
    # pooled row and a partly filled channel group (5 = 3 + 2).
    ("tiled_pad", (11, 2, 5, 18), (5, 2, 4, 5), (1, 1), 2, True, "fd", 2),
    ("direct", (1, 16, 40, 40), (8, 16, 3, 3), (1, 1), 2, True, "fd", 2),  # too big for smem
    ("groups", (1, 64, 9, 9), (64, 64, 3, 3), (0, 0), 2, True, "fd", 2),  # channel groups
    ("direct_pool16", (1, 16, 40, 40), (8, 16, 3, 3), (1, 1), 16, True, "f", 2),
    ("direct_pool3", (1, 16, 41, 40), (8, 16, 3, 3), (1, 1), 3, False, "f", 2),
]
# What the grid's plans must include, per kernel (from the NAME.plan files):
# several images per block with the last block partly filled, several
# grad_weight chunks per block with the last chunk partly filled, several
# batch slices. An over-read or a dropped image at the end of a batch only
# shows in such a case (ASan: the buffers are exact; values: the last images).
PLAN_COVERAGE = {
    "forward: several images per block, last block partly filled": lambda k, p, n: k == "forward"
    and p["fast"]
    and not p["tiled"]
    and p["imgs"] > 1
    and n % p["imgs"] != 0,
    "forward (tiled): last block partly filled": lambda k, p, n: k == "forward" and p["tiled"] and n % p["imgs"] != 0,
    "grad_input (1 channel per thread): several images per block, last partly filled": lambda k, p, n: k
    == "backward_input"
    and p["fast"]
    and p["cb"] == 1
    and p["imgs"] > 1
    and n % p["imgs"] != 0,
    "grad_input (4 channels per thread): several images per block, last partly filled": lambda k, p, n: k
    == "backward_input"
    and p["fast"]
    and p["cb"] == 4
    and p["imgs"] > 1
    and n % p["imgs"] != 0,
    "grad_input (patch): several images per block, last partly filled": lambda k, p, n: k == "backward_input"
    and p["patch"]
    and n % p["imgs"] != 0,
    "grad_weight: several chunks per block, last chunk partly filled": lambda k, p, n: k == "backward_weight"
    and p["fast"]
    and not p["dense"]
    and p["chunks"] > p["blocks"]
    and n % p["imgs"] != 0,
    "grad_weight (dense): several chunks per block, last chunk partly filled": lambda k, p, n: k == "backward_weight"
    and p["dense"]
    and p["chunks"] > p["blocks"]
    and n % p["imgs"] != 0,
    "grad_weight: several batch slices, uneven over the chunk": lambda k, p, n: k == "backward_weight"
    and p["fast"]
    and not p["dense"]
    and p["slices"] > 1
    and p["imgs"] % p["slices"] != 0,
}
MASKS = [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (0, 0, 0)]
MASKED_SHAPES = {"seed2_f", "direct_f", "pool16_f"}  # every output_mask subset on these
# Run twice with different block orders (and thread interleavings): the
# gradients must not change by one bit.
REPEATED_SHAPES = {"randn_f", "randn_k3_f", "seed2_multichunk_f", "slices_f", "direct_f", "seed1_d"}
# Every kernel variant op_body.h can launch must run somewhere in the grid.
EXPECTED_KERNELS = [
    "forward_tiled_kernel<float, float, unsigned char>",
    "forward_tiled_kernel<double, double, unsigned char>",
    "forward_kernel<float, float, unsigned char, 2>",
    "forward_kernel<double, double, unsigned char, 2>",
    "forward_kernel<float, float, unsigned char, 0>",
    "forward_kernel<float, float, int, 0>",
    "forward_kernel<double, double, int, 0>",
    "forward_direct_kernel<float, float, unsigned char>",
    "forward_direct_kernel<double, double, unsigned char>",
    "forward_direct_kernel<float, float, int>",
    "backward_input_kernel<float, float, unsigned char, 1>",
    "backward_input_kernel<float, float, unsigned char, 4>",
    "backward_input_kernel<double, double, unsigned char, 4>",
    "backward_input_kernel<float, float, int, 4>",
    "backward_input_patch_kernel<float, float, unsigned char>",
    "backward_input_patch_kernel<double, double, unsigned char>",
    "backward_input_direct_kernel<float, float, unsigned char>",
    "backward_input_direct_kernel<double, double, unsigned char>",
    "backward_weight_kernel<float, float, unsigned char>",
    "backward_weight_kernel<double, double, int>",
    "backward_weight_dense_kernel<float, float, unsigned char, 6, 24>",
    "backward_weight_dense_kernel<double, double, unsigned char, 6, 24>",
    "backward_weight_dense_kernel<float, float, unsigned char, 12, 8>",
    "backward_weight_dense_kernel<double, double, unsigned char, 12, 8>",
    "backward_weight_direct_kernel<float, float, unsigned char>",
    "backward_weight_direct_kernel<double, double, unsigned char>",
    "reduce_partials_kernel<float, float, unsigned char>",
    "reduce_partials_kernel<double, double, int>",
]


def _dyadic(shape, gen, dtype):
    # Multiples of 1/4 in [-3/4, 3/4] (op_helpers.dyadic): every sum of
    # products is exact in float32 and float64 whatever the order, so results
    # compare exactly, and equal values (ties between window positions) are frequent.
    return dyadic(shape, gen, dtype, low=-3, high=3)


def _harness_cases():
    """(name, kind, tensors, meta) for the whole grid."""
    cases = []
    for name, xs, ws, pad, pool, has_b, dts, sms in HARNESS_SHAPES:
        for dt in dts:
            dtype = torch.float32 if dt == "f" else torch.float64
            gen = torch.Generator().manual_seed(len(cases))
            x = _dyadic(xs, gen, dtype)
            w = _dyadic(ws, gen, dtype)
            b = _dyadic((ws[0],), gen, dtype) if has_b else None
            cases.append((f"{name}_{dt}", x, w, b, pad, pool, sms))
    gen = torch.Generator().manual_seed(99)
    # Ties everywhere: a constant image (every window position equal).
    x = torch.full((2, 1, 12, 12), 0.25)
    cases.append(("ties_f", x, _dyadic((3, 1, 3, 3), gen, torch.float32).abs(), None, (0, 0), 2, 2))
    # NaN propagates (output, grad_input) and is skipped where no gradient flows.
    x = _dyadic((3, 2, 10, 10), gen, torch.float64)
    x[0, 0, 3, 3] = float("nan")
    x[1, 1, 5, 6] = float("nan")
    cases.append(
        ("nan_d", x, _dyadic((4, 2, 3, 3), gen, torch.float64), _dyadic((4,), gen, torch.float64), (1, 1), 2, 2)
    )
    # Non-contiguous input and weight: the op's contiguity copies.
    x = _dyadic((3, 6, 12, 12), gen, torch.float32).to(memory_format=torch.channels_last)
    w = _dyadic((12, 6, 5, 5), gen, torch.float32).transpose(2, 3).contiguous().transpose(2, 3)
    cases.append(("layout_f", x, w, _dyadic((12,), gen, torch.float32), (0, 0), 2, 2))
    # Not exact (normal values): float32 sums whose value depends on the order,
    # over 4 blocks (with 2, a + b == b + a would hide an order dependence).
    x = torch.randn((32, 1, 28, 28), generator=gen)
    cases.append(
        ("randn_f", x, torch.randn((6, 1, 5, 5), generator=gen) / 5, torch.randn(6, generator=gen), (0, 0), 2, 2)
    )
    # The same for the per-element grad_weight kernel (3-wide filters).
    x = torch.randn((64, 2, 10, 10), generator=gen)
    cases.append(
        ("randn_k3_f", x, torch.randn((4, 2, 3, 3), generator=gen) / 4, torch.randn(4, generator=gen), (1, 1), 2, 2)
    )
    return cases


@pytest.fixture(scope="module")
def harness_cases():
    return _harness_cases()


@pytest.fixture(scope="module")
def harness_builds(tmp_path_factory):
    # Both sanitizer builds at once (they are independent and take most of
    # this file's time).
    if driver.find_compiler() is None:
        pytest.fail("the CUDA execution harness needs a C++20 compiler (g++ or clang++; set CXX)")
    out = tmp_path_factory.mktemp("harness")
    return driver.build_all(HARNESS_SANITIZERS, out)


# Both always in CI; mutation_check.py may pick one.
HARNESS_SANITIZERS = os.environ.get("FMNIST_HARNESS_SANITIZERS", "tsan,asan").split(",")


@pytest.fixture(params=HARNESS_SANITIZERS)
def harness(request, harness_builds):
    return request.param, harness_builds[request.param]


def _run(harness, d, names, env=None):
    sanitizer, exe = harness
    r = driver.run(exe, sanitizer, d, names, env=env)
    assert r.returncode == 0, f"harness ({sanitizer}) failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    assert f"ran {len(names)} cases" in r.stdout
    return r


def _cpu_op(*args):
    assert _library.LOADED and "cpu" in _library.COMPILED_DEVICE_TYPES, _library.NOT_LOADED_REASON
    return op(*args)


def _exact(a, e, what):
    assert a.shape == e.shape and a.dtype == e.dtype, (what, a.shape, e.shape, a.dtype, e.dtype)
    torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _windows(t, pool):
    """(N, C, ph, pw, pool*pool): the pool windows of a convolution output, in
    the saved index's order (row by row)."""
    n, c, oh, ow = t.shape
    ph, pw = oh // pool, ow // pool
    t = t[:, :, : ph * pool, : pw * pool].reshape(n, c, ph, pool, pw, pool)
    return t.permute(0, 1, 2, 4, 3, 5).reshape(n, c, ph, pw, pool * pool)


F32_UNIT = 2.0**-24  # float32's unit roundoff


def _assert_float64_at_own_winners(what, x, w, b, pad, pool, out, ind, go=None, grads=None, mask=None):
    """The winner-aware float64 comparison, for data whose sums are not exact.

    The kernels sum in their own order, so where a pool window's two largest
    values are closer than float32 rounding their winner may differ from any
    other implementation's, and comparing with another implementation would
    be a false alarm. So: the winner must be a maximum of its window to within
    the rounding bound; the output must equal the float64 convolution at that
    winner to within it; and every gradient must equal the float64 backward
    (the CPU kernels in float64) given these same winners. The bound of a
    float32 sum of m terms is (m + 1) * u * (the same sum of absolute values),
    computed here in float64 from the data."""
    x64, w64 = x.double(), w.double()
    b64 = b.double() if b is not None else None
    conv = _windows(torch.nn.functional.conv2d(x64, w64, b64, padding=pad), pool)
    mag = _windows(
        torch.nn.functional.conv2d(x64.abs(), w64.abs(), b64.abs() if b is not None else None, padding=pad), pool
    )
    terms = w.shape[1] * w.shape[2] * w.shape[3] + 1
    bound = ((terms + 1) * F32_UNIT * mag).amax(-1)
    j = ind.long()
    won = j < pool * pool
    at = conv.gather(-1, j.clamp(max=pool * pool - 1).unsqueeze(-1)).squeeze(-1)
    best = conv.amax(-1)
    assert bool(((best - at <= 2 * bound) | ~won).all()), f"{what}: a winner is not a maximum of its window"
    assert bool((((out.double() - at).abs() <= bound) | ~won).all()), f"{what}: output != conv at its winner"
    assert bool((((out == 0) & (best <= bound)) | won).all()), f"{what}: a no-gradient window is not ReLU'd"
    if grads is None:
        return
    want = bwd_op(go.double(), x64, w64, ind, list(pad), pool, [bool(m) for m in mask])
    mags = bwd_op(go.double().abs(), x64.abs(), w64.abs(), ind, list(pad), pool, [bool(m) for m in mask])
    n_terms = (
        w.shape[0] * w.shape[2] * w.shape[3],  # grad_input: winners reaching a pixel, at most one per tap
        out.shape[0] * out.shape[2] * out.shape[3],  # grad_weight, grad_bias: every cell of the channel
        out.shape[0] * out.shape[2] * out.shape[3],
    )
    for k, (g_, e_, s_, m_) in enumerate(zip(grads, want, mags, n_terms)):
        if not mask[k]:
            continue
        err = (g_.double() - e_).abs()
        tol = (m_ + 1) * F32_UNIT * s_
        assert bool((err <= tol).all()), (
            f"{what} {('grad_input', 'grad_weight', 'grad_bias')[k]}: {float((err - tol).max())}"
        )


def _read_plans(path):
    """NAME.plan (harness.cpp's write_plans): n and {kernel: {key: int}}."""
    lines = [ln.split() for ln in path.read_text().splitlines()]
    n = int(dict(kv.split("=") for kv in lines[0][1:])["n"])
    return n, {ln[0]: {k: int(v) for k, v in (kv.split("=") for kv in ln[1:])} for ln in lines[1:]}


def test_harness_runs_the_cuda_kernels_like_the_cpu_kernels_and_stock(harness, harness_cases, tmp_path):
    """Forward and every gradient of the real CUDA kernels (run on CPU threads
    under a sanitizer) equal the CPU kernels exactly, and the stock sequence;
    on the one case whose sums are not exact (randn_f), the winner-aware
    float64 comparison instead."""
    fwd_names, bwd = [], []
    for name, x, w, b, pad, pool, sms in harness_cases:
        dt = "f64" if x.dtype == torch.float64 else "f32"
        meta = dict(op="fwd", dtype=dt, pool=pool, pad=pad, sms=sms, seed=1, bias=int(b is not None))
        driver.write_case(tmp_path, name, meta, dict(x=x, w=w, **({"b": b} if b is not None else {})))
        fwd_names.append(name)
    _run(harness, tmp_path, fwd_names)

    launched = ""
    bwd_names = []
    plans = []  # (case, n, {kernel: plan})
    for name, x, w, b, pad, pool, sms in harness_cases:
        launched += (tmp_path / f"{name}.launches").read_text()
        plans.append((name, *_read_plans(tmp_path / f"{name}.plan")))
        idx_dtype = torch.uint8 if pool <= 15 else torch.int32
        out = driver.read_tensor(tmp_path / f"{name}.out", x.dtype)
        ind = driver.read_tensor(tmp_path / f"{name}.ind", idx_dtype)
        exact = not name.startswith("randn")
        if exact:
            want_out, want_ind = _cpu_op(x, w, b, list(pad), pool)
            _exact(out, want_out, f"{name} forward output vs CPU kernels")
            assert torch.equal(ind, want_ind), f"{name}: winner indices differ from the CPU kernels"
            ref = stock(x, w, b, pad, pool)
            torch.testing.assert_close(
                out, ref, rtol=0, atol=0, equal_nan=True, msg=lambda m, name=name: f"{name} forward vs stock: {m}"
            )
        else:
            _assert_float64_at_own_winners(f"{name} forward", x, w, b, pad, pool, out, ind)
        gen = torch.Generator().manual_seed(7)
        go = _dyadic(out.shape, gen, x.dtype) if exact else torch.randn(out.shape, generator=gen)
        if name.startswith("layout"):
            go = go.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous grad_output
        masks = MASKS if name in MASKED_SHAPES else [(1, 1, int(b is not None))]
        for k, mask in enumerate(masks):
            for seed in (1, 2) if name in REPEATED_SHAPES and k == 0 else (1,):
                bname = f"{name}_m{k}_s{seed}"
                meta = dict(
                    op="bwd",
                    dtype="f64" if x.dtype == torch.float64 else "f32",
                    pool=pool,
                    pad=pad,
                    sms=sms,
                    seed=seed,
                    mask=mask,
                )
                driver.write_case(tmp_path, bname, meta, dict(x=x, w=w, go=go, idx=ind))
                bwd_names.append(bname)
                bwd.append((bname, x, w, b, go, ind, pad, pool, mask, seed, out, exact))
    _run(harness, tmp_path, bwd_names)

    for bname, x, w, b, go, ind, pad, pool, mask, seed, out, exact in bwd:
        got = [driver.read_tensor(tmp_path / f"{bname}.{k}", x.dtype) for k in ("gi", "gw", "gb")]
        launched += (tmp_path / f"{bname}.launches").read_text()
        plans.append((bname, *_read_plans(tmp_path / f"{bname}.plan")))
        for g_, m in zip(got, mask):
            if not m:
                assert g_.shape == (0,), f"{bname}: an unrequested gradient is not empty"
        if exact:
            want = bwd_op(go, x, w, ind, list(pad), pool, [bool(m) for m in mask])
            for k, (g_, e_, m) in enumerate(zip(got, want, mask)):
                if m:
                    _exact(g_, e_, f"{bname} {('grad_input', 'grad_weight', 'grad_bias')[k]} vs CPU kernels")
        else:
            _assert_float64_at_own_winners(bname, x, w, b, pad, pool, out, ind, go, got, mask)
        if seed == 2:
            first = [driver.read_tensor(tmp_path / f"{bname[:-1]}1.{k}", x.dtype) for k in ("gi", "gw", "gb")]
            for a_, b_ in zip(got, first):
                assert torch.equal(
                    a_.view(torch.uint8) if a_.numel() else a_, b_.view(torch.uint8) if b_.numel() else b_
                ), f"{bname}: another block order changed the result (not bitwise reproducible)"
        if exact and mask == (1, 1, int(b is not None)) and not torch.isnan(x).any() and x.shape[0] > 0:
            # The stock sequence's gradients (autograd of conv2d/relu/max_pool2d),
            # exactly: the data are exact, so both see the same winners.
            params = [t.detach().clone().requires_grad_(True) for t in (x, w) + ((b,) if b is not None else ())]
            ref = stock(params[0], params[1], params[2] if b is not None else None, pad, pool)
            grads = torch.autograd.grad(ref, params, go)
            for g_, e_ in zip(got, grads):
                torch.testing.assert_close(g_, e_, rtol=0, atol=0, msg=lambda s, bname=bname: f"{bname} vs stock: {s}")

    # The repeats of the random cases can only see an order dependence with
    # >= 3 blocks.
    for case, kernel in (("randn_f", "backward_weight_dense_kernel"), ("randn_k3_f", "backward_weight_kernel<")):
        wk = [ln for ln in (tmp_path / f"{case}_m0_s1.launches").read_text().splitlines() if kernel in ln]
        assert wk and int(wk[0].split()[0]) >= 3, (case, wk)
    missing = [k for k in EXPECTED_KERNELS if f"conv_relu_maxpool2d_{k}" not in launched]
    assert not missing, f"kernel variants never launched by the grid: {missing}"
    uncovered = [
        what
        for what, holds in PLAN_COVERAGE.items()
        if not any(holds(kernel, p, n) for _, n, ps in plans for kernel, p in ps.items())
    ]
    assert not uncovered, f"no case of the grid runs: {uncovered}"


def test_harness_out_of_window_indices_pass_no_gradient(harness, tmp_path):
    """A saved index outside the pool window (e.g. 255 with pool 2, only
    reachable by calling the backward op directly) is "no gradient", on the
    fast and the direct paths, never an out-of-bounds read (ASan)."""
    gen = torch.Generator().manual_seed(3)
    cases = []
    for name, xs, ws, pool, idx_dtype, bad in [
        ("fast_u8", (4, 6, 12, 12), (12, 6, 5, 5), 2, torch.uint8, [255, 5, 200]),
        ("direct_u8", (1, 16, 40, 40), (8, 16, 3, 3), 2, torch.uint8, [255, 4 + 1, 17]),
        ("fast_i32", (2, 2, 20, 19), (3, 2, 3, 2), 16, torch.int32, [-1, 257, 2**31 - 1, -(2**31)]),
    ]:
        x = _dyadic(xs, gen, torch.float32)
        w = _dyadic(ws, gen, torch.float32)
        ph = (xs[2] - ws[2] + 1) // pool
        pw = (xs[3] - ws[3] + 1) // pool
        shape = (xs[0], ws[0], ph, pw)
        valid = torch.randint(0, pool * pool + 1, shape, generator=gen).to(idx_dtype)
        pick = torch.rand(shape, generator=gen) < 0.3
        junk = torch.tensor(bad, dtype=idx_dtype)[torch.randint(0, len(bad), shape, generator=gen)]
        idx = torch.where(pick, junk, valid)
        clean = torch.where(pick, torch.full_like(valid, pool * pool), valid)  # "no gradient"
        go = _dyadic(shape, gen, torch.float32)
        for tag, ind in (("bad", idx), ("clean", clean)):
            meta = dict(op="bwd", dtype="f32", pool=pool, pad=(0, 0), sms=2, seed=1, mask=(1, 1, 1))
            driver.write_case(tmp_path, f"{name}_{tag}", meta, dict(x=x, w=w, go=go, idx=ind))
        cases.append((name, x, w, go, clean, pool))
    _run(harness, tmp_path, [f"{c[0]}_{t}" for c in cases for t in ("bad", "clean")])
    for name, x, w, go, clean, pool in cases:
        want = bwd_op(go, x, w, clean, [0, 0], pool, [True, True, True])
        for k, e_ in zip(("gi", "gw", "gb"), want):
            bad = driver.read_tensor(tmp_path / f"{name}_bad.{k}", torch.float32)
            cln = driver.read_tensor(tmp_path / f"{name}_clean.{k}", torch.float32)
            _exact(bad, cln, f"{name} {k}: out-of-window index vs no-gradient marker")
            _exact(cln, e_, f"{name} {k} vs CPU kernels")


def test_harness_non_finite_grad_output_reaches_only_the_winners_taps(harness, tmp_path):
    """An inf or NaN gradient reaches the input only through its winner's
    filter taps, as in the CPU kernels and stock: the winner-patch grad_input
    must not multiply it by the zeros around its shifted filter (blocks 0
    and 1 of 32 images hold one each, block 2 none)."""
    gen = torch.Generator().manual_seed(11)
    x, w = _dyadic((70, 6, 12, 12), gen, torch.float32), _dyadic((12, 6, 5, 5), gen, torch.float32)
    meta = dict(op="fwd", dtype="f32", pool=2, pad=(0, 0), sms=2, seed=1, bias=0)
    driver.write_case(tmp_path, "fwd", meta, dict(x=x, w=w))
    _run(harness, tmp_path, ["fwd"])
    ind = driver.read_tensor(tmp_path / "fwd.ind", torch.uint8)
    go = _dyadic(ind.shape, gen, torch.float32)
    go[3, 5, 1, 2] = float("inf")
    go[40, 0, 3, 3] = float("nan")
    driver.write_case(tmp_path, "bwd", dict(meta, op="bwd", mask=(1, 1, 1)), dict(x=x, w=w, go=go, idx=ind))
    _run(harness, tmp_path, ["bwd"])
    assert "patch=1" in (tmp_path / "bwd.plan").read_text()
    for k, e_ in zip(("gi", "gw", "gb"), bwd_op(go, x, w, ind, [0, 0], 2, [True, True, True])):
        got = driver.read_tensor(tmp_path / f"bwd.{k}", torch.float32)
        assert not torch.isfinite(e_).all()
        _exact(got, e_, f"{k} with a non-finite grad_output")


def test_harness_sm_count_override_reaches_the_plans(harness, tmp_path):
    """FMNIST_CUDA_SM_COUNT (sm_count.h) replaces the device's SM count in
    every plan of the op (the self-check and gpu_check.sh use it to give a
    small batch a big batch's plans); a value that is not a count is refused."""
    gen = torch.Generator().manual_seed(5)
    x, w, b = _dyadic((17, 6, 12, 12), gen, torch.float32), _dyadic((12, 6, 5, 5), gen, torch.float32), None
    meta = dict(op="fwd", dtype="f32", pool=2, pad=(0, 0), sms=132, seed=1, bias=0)
    driver.write_case(tmp_path, "fwd", meta, dict(x=x, w=w))
    _run(harness, tmp_path, ["fwd"], env={"FMNIST_CUDA_SM_COUNT": "1"})
    out = driver.read_tensor(tmp_path / "fwd.out", torch.float32)
    ind = driver.read_tensor(tmp_path / "fwd.ind", torch.uint8)
    go = _dyadic(out.shape, gen, torch.float32)
    driver.write_case(tmp_path, "bwd", dict(meta, op="bwd", mask=(1, 1, 0)), dict(x=x, w=w, go=go, idx=ind))
    _run(harness, tmp_path, ["bwd"], env={"FMNIST_CUDA_SM_COUNT": "1"})
    _, fwd_plans = _read_plans(tmp_path / "fwd.plan")
    _, bwd_plans = _read_plans(tmp_path / "bwd.plan")
    assert "sms=1" in (tmp_path / "bwd.plan").read_text()
    # The tiled forward's plan is the same for any SM count (8 images per
    # block); 132 SMs would plan one grad_weight chunk per block.
    assert fwd_plans["forward"]["tiled"] and fwd_plans["forward"]["blocks"] == 3, fwd_plans
    assert bwd_plans["backward_weight"]["chunks"] > bwd_plans["backward_weight"]["blocks"], bwd_plans
    want_out, want_ind = _cpu_op(x, w, b, [0, 0], 2)
    _exact(out, want_out, "forward under the override")
    assert torch.equal(ind, want_ind)
    for k, e_ in zip(("gi", "gw"), bwd_op(go, x, w, ind, [0, 0], 2, [True, True, False])):
        _exact(driver.read_tensor(tmp_path / f"bwd.{k}", torch.float32), e_, f"{k} under the override")
    sanitizer, exe = harness
    for bad in ("0", "12x", "-3", "70000"):
        r = driver.run(exe, sanitizer, tmp_path, ["fwd"], env={"FMNIST_CUDA_SM_COUNT": bad})
        assert r.returncode == 1 and "FMNIST_CUDA_SM_COUNT must be an integer in [1, 65536]" in r.stderr, (bad, r)


def test_harness_sm_count_cache_is_thread_safe(harness):
    sanitizer, exe = harness
    r = subprocess.run(
        [str(exe), "--sm-count"],
        capture_output=True,
        text=True,
        env=dict(os.environ, **driver.SANITIZER_ENV[sanitizer]),
        timeout=120,
    )
    assert r.returncode == 0 and "sm-count ok" in r.stdout, r.stdout + r.stderr


# --------------------------------------------------------------------------
# Build decisions about versions (cmake/cuda_checks.cmake), fed fake versions.


def _cmake():
    found = Path(sys.executable).with_name("cmake")
    return str(found) if found.is_file() else shutil.which("cmake")


def _probe(
    mode,
    archs,
    cmake_ver="3.30.0",
    cxx_std=20,
    torch_cuda="13.0",
    nvcc=None,
    nvcc_version="13.0",
    supported="75;80;86;89;90;100;120",
):
    cmake = _cmake()
    if cmake is None:
        pytest.fail("cmake not found (pip install cmake)")
    args = [
        cmake,
        f"-DMODE={mode}",
        f"-DCMAKE_VER={cmake_ver}",
        f"-DCXX_STD={cxx_std}",
        f"-DTORCH_CUDA={torch_cuda}",
        f"-DARCHS={archs}",
    ]
    args += [f"-DNVCC={nvcc}"] if nvcc else [f"-DNVCC_VERSION={nvcc_version}", f"-DSUPPORTED={supported}"]
    r = subprocess.run(
        [*args, "-P", str(ROOT / "cmake" / "cuda_checks_probe.cmake")], capture_output=True, text=True, timeout=60
    )
    out = r.stdout + r.stderr
    why = re.search(r"^WHY=(.*)$", out, re.M)
    kept = re.search(r"^ARCHS=(.*)$", out, re.M)
    flat = " ".join(out.split())  # CMake wraps its error messages
    return r.returncode, (why.group(1) if why else None), (kept.group(1) if kept else None), flat


def test_cmake_arch_list_with_an_arch_nvcc_cannot_build():
    rc, why, kept, out = _probe("AUTO", "70-real;80-real;90")
    assert rc == 0 and why == "" and kept == "80-real;90", out
    assert "dropping CUDA architecture(s) 7.0" in out
    rc, why, kept, out = _probe("AUTO", "70-real;90a-real", supported="75")
    assert rc == 0 and "cannot build any architecture" in why and "7.0 9.0a" in why, out
    rc, _, _, out = _probe("ON", "70-real;80-real;90")
    assert rc != 0 and "FMNIST_CUDA=ON" in out and "architecture(s) 7.0" in out, out


def test_cmake_nvcc_major_must_match_torch_cuda():
    rc, why, _, out = _probe("AUTO", "80-real", torch_cuda="12.8", nvcc_version="13.0")
    assert rc == 0 and "nvcc 13.0 and torch's CUDA 12.8 differ in major version" in why, out
    rc, _, _, out = _probe("ON", "80-real", torch_cuda="12.8", nvcc_version="13.0")
    assert rc != 0 and "differ in major version" in out, out
    rc, why, kept, out = _probe("AUTO", "80-real", torch_cuda="13.0", nvcc_version="13.1")
    assert rc == 0 and why == "" and kept == "80-real", out


def test_cmake_too_old_for_cuda_cxx20():
    rc, why, _, out = _probe("AUTO", "80-real", cmake_ver="3.25.1", cxx_std=20)
    assert rc == 0 and "CMake 3.25.1 cannot compile CUDA as C++20" in why, out
    rc, _, _, out = _probe("ON", "80-real", cmake_ver="3.25.1", cxx_std=20)
    assert rc != 0 and "CMake 3.25.1" in out, out
    rc, why, _, out = _probe("AUTO", "80-real", cmake_ver="3.25.1", cxx_std=17)
    assert rc == 0 and why == "", out  # torch < 2.13 builds C++17, which 3.25 can do


def test_pyproject_never_picks_a_cmake_without_cuda_cxx20():
    import tomllib
    from packaging.specifiers import SpecifierSet

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    spec = SpecifierSet(conf["tool"]["scikit-build"]["cmake"]["version"])
    assert "3.25.2" not in spec and "3.18.0" not in spec and "3.26.0" in spec
    assert any(r.replace(" ", "").startswith("cmake>=3.26") for r in conf["build-system"]["requires"])


def test_cmake_reads_the_real_nvcc():
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    rc, why, kept, out = _probe("AUTO", "80-real;90", nvcc=nvcc, torch_cuda="13.0")
    assert rc == 0 and kept is not None, out
    version = re.search(
        r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    ).group(1)
    if version == "13":
        assert why == "" and kept == "80-real;90", out
        rc, why, kept, out = _probe("AUTO", "70-real;80-real", nvcc=nvcc, torch_cuda="13.0")
        assert kept == "80-real" and "dropping CUDA architecture(s) 7.0" in out, out


def _find_nvcc() -> str | None:
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if base and (Path(base) / "bin" / "nvcc").is_file():
            return str(Path(base) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None


# --------------------------------------------------------------------------
# On a GPU: what has no CPU analogue


def make(shape_x, shape_w, bias=True, dtype=torch.float32, device="cuda", seed=0, exact=False, x_range=8):
    """Input, weight and bias. exact=True: small dyadic numbers (op_helpers.dyadic:
    x in multiples of 1/4 up to x_range/4, weight and bias of 1/32 up to 1/4),
    for any comparison of two implementations that sum in different orders:
    on random reals a window whose two largest values differ by less than the
    rounding picks a different winner on each side and moves a whole gradient
    term (a false alarm on correct kernels, likelier the larger the batch)."""
    gen = torch.Generator().manual_seed(seed)
    if exact:
        x = dyadic(shape_x, gen, dtype, low=-x_range, high=x_range)
        w = dyadic(shape_w, gen, dtype, scale=1 / 32)
        b = dyadic((shape_w[0],), gen, dtype, scale=1 / 32) if bias else None
    else:
        x = torch.randn(shape_x, generator=gen, dtype=dtype)
        w = torch.randn(shape_w, generator=gen, dtype=dtype) / (shape_w[1] * shape_w[2] * shape_w[3]) ** 0.5
        b = torch.randn(shape_w[0], generator=gen, dtype=dtype) * 0.1 if bias else None
    return x.to(device), w.to(device), (b.to(device) if b is not None else None)


@gpu
@pytest.mark.parametrize("block", [1, 2])
def test_cuda_graph_capture_and_replay_forward_backward(block):
    shape_x, shape_w = ((32, 1, 28, 28), (6, 1, 5, 5)) if block == 1 else ((32, 6, 12, 12), (12, 6, 5, 5))
    x, w, b = make(shape_x, shape_w, True, torch.float32)
    static_x = x.clone().requires_grad_(True)
    static_w = w.clone().requires_grad_(True)
    static_b = b.clone().requires_grad_(True)
    params = [static_x, static_w, static_b]

    def step():
        out = fmnist_ext.conv_relu_maxpool2d(static_x, static_w, static_b, 0, 2)
        grads = torch.autograd.grad(out.square().sum(), params)
        return out, grads

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up outside the graph
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_grads = step()

    for seed in (1, 2):
        nx, nw, nb = make(shape_x, shape_w, True, torch.float32, seed=seed)
        with torch.no_grad():
            static_x.copy_(nx)
            static_w.copy_(nw)
            static_b.copy_(nb)
        graph.replay()
        torch.cuda.synchronize()
        e_out, e_grads = step()
        torch.testing.assert_close(g_out, e_out, rtol=0, atol=0)
        for a, e in zip(g_grads, e_grads):
            torch.testing.assert_close(a, e, rtol=0, atol=0)  # fixed-order reductions: bitwise


@gpu
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,cin,h,width,cout,k,padding,pool", GRID)
def test_cuda_equals_cpu_kernels_float64(n, cin, h, width, cout, k, padding, pool, bias):
    # The two backends against each other (not only each against stock), bit
    # for bit: exact data (see make), so the different summation orders give
    # the same values, ties and winners.
    kh, kw = (k, k) if isinstance(k, int) else k
    pad = [padding, padding] if isinstance(padding, int) else list(padding)
    x, w, b = make((n, cin, h, width), (cout, cin, kh, kw), bias, torch.float64, device="cpu", seed=3, exact=True)
    assert "cpu" in _library.COMPILED_DEVICE_TYPES
    out_c, idx_c = op(x, w, b, pad, pool)
    out_g, idx_g = op(x.cuda(), w.cuda(), b.cuda() if b is not None else None, pad, pool)
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=0, atol=0)
    assert torch.equal(idx_g.cpu(), idx_c)
    g = dyadic(out_c.shape, torch.Generator().manual_seed(4), torch.float64, low=-4, high=4)
    mask = [True, True, bias]
    got = bwd_op(g.cuda(), x.cuda(), w.cuda(), idx_g, pad, pool, mask)
    want = bwd_op(g, x, w, idx_c, pad, pool, mask)
    for a, e in zip(got, want):
        assert a.shape == e.shape
        torch.testing.assert_close(a.cpu(), e, rtol=0, atol=0)


@gpu
def test_nan_and_ties_follow_the_cpu_rules():
    # Exact data (bias included: a rounded bias added first could split a tie
    # differently in the two summation orders): many ties between window positions.
    x, w, b = make((3, 2, 10, 10), (4, 2, 3, 3), True, torch.float64, device="cpu", seed=5, exact=True)
    x[0, 0, 3, 3] = float("nan")
    x[1, 1, 5, 6] = float("nan")
    out_c, idx_c = op(x, w, b, [1, 1], 2)
    out_g, idx_g = op(x.cuda(), w.cuda(), b.cuda(), [1, 1], 2)
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx_g.cpu(), idx_c)


@gpu
def test_batch_of_60000_images_in_one_call():
    # The whole training set in one launch: grid sizes beyond CUDA's 65535
    # limit on the y and z dimensions, and 32-bit offsets near their range.
    # Compared exactly with the stock sequence in float64 (cuDNN off): the data
    # are dyadic (see make) and small enough that every partial sum of the
    # float32 reductions is exact too. A grad_weight partial sum is a sum of
    # g * x terms, multiples of 1/16, and at most sum(|g|) * max|x| in size:
    # below 2**20 (asserted) it is exact in float32 whatever the order.
    # (On random reals the 8.6 million pool windows of a batch hold near-ties
    # that stock and fused break differently: a false alarm on correct kernels.)
    gen = torch.Generator().manual_seed(11)
    for shape_x, shape_w, x_range, want_input in (
        ((60000, 1, 28, 28), (6, 1, 5, 5), 1, False),  # block 1: training's mask (no grad_input)
        ((60000, 6, 12, 12), (12, 6, 5, 5), 8, True),
    ):
        x, w, b = make(shape_x, shape_w, True, torch.float32, seed=shape_x[1], exact=True, x_range=x_range)
        x.requires_grad_(want_input)
        w.requires_grad_(True)
        b.requires_grad_(True)
        out = fmnist_ext.conv_relu_maxpool2d(x, w, b, 0, 2)
        g = dyadic(out.shape, gen, torch.float32, low=-1, high=1, device="cuda")
        assert float(g.abs().sum((0, 2, 3)).max() * x.abs().max()) < 2**20
        leaves = [t for t in (x, w, b) if t.requires_grad]
        got = torch.autograd.grad(out, leaves, g)
        want_out, want = float64_stock_on_device(x, w, b, 0, 2, g)
        torch.testing.assert_close(out.double(), want_out, rtol=0, atol=0)
        for a, e in zip(got, want):
            torch.testing.assert_close(a.double(), e, rtol=0, atol=0)


@gpu
def test_module_on_cuda_and_current_stream():
    block = fmnist_ext.FusedConvReLUMaxPool2d(1, 6, 5).cuda()
    x, w, b = make((16, 1, 28, 28), (6, 1, 5, 5), True, exact=True)  # exact: see make
    with torch.no_grad():
        block.weight.copy_(w)
        block.bias.copy_(b)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = block(x)
        y.sum().backward()
    s.synchronize()
    torch.testing.assert_close(y, stock(x, block.weight, block.bias, 0, 2), rtol=0, atol=0)
    assert block.weight.grad is not None and block.bias.grad is not None


@gpu
@pytest.mark.parametrize("block", [1, 2])
def test_backward_is_bitwise_reproducible_under_deterministic_algorithms(block):
    shape_x, shape_w = ((4096, 1, 28, 28), (6, 1, 5, 5)) if block == 1 else ((4096, 6, 12, 12), (12, 6, 5, 5))
    x, w, b = make(shape_x, shape_w, True, torch.float32)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # the op must not raise or alert
    try:
        out, idx = op(x, w, b, [0, 0], 2)
        g = torch.randn_like(out)
        first = bwd_op(g, x, w, idx, [0, 0], 2, [True, True, True])
        for _ in range(3):
            again = bwd_op(g, x, w, idx, [0, 0], 2, [True, True, True])
            for a, e in zip(again, first):
                assert torch.equal(a, e)
    finally:
        torch.use_deterministic_algorithms(old)
