"""The fused operator on CUDA: the CPU kernels' correctness checks, on the GPU.

Tests marked `gpu` need a CUDA device and the compiled CUDA kernels and are
skipped otherwise, with the reason. Two tests run without a GPU:
  * the CUDA kernels are registered whenever the build says it built them;
  * the kernels' block phases and launch plans, run on the host by
    tests/cuda_emulation/emulate.cu (needs nvcc), match a naive reference.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fmnist_ext
from fmnist_ext import _library

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA_KERNELS = "cuda" in _library.COMPILED_DEVICE_TYPES

if not torch.cuda.is_available():
    _skip_reason = "no CUDA device"
elif not HAS_CUDA_KERNELS:
    _skip_reason = "fmnist_ext was built without CUDA kernels (or the library is not loaded)"
else:
    _skip_reason = ""
gpu = pytest.mark.skipif(bool(_skip_reason), reason=_skip_reason or "n/a")

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


def _find_nvcc() -> str | None:
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if base and (Path(base) / "bin" / "nvcc").is_file():
            return str(Path(base) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None


@pytest.mark.slow
def test_cuda_kernels_host_emulation(tmp_path):
    """The CUDA kernels' phases and plans, run on the host, equal a naive reference."""
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    src = ROOT / "tests" / "cuda_emulation" / "emulate.cu"
    exe = tmp_path / "emulate"
    base = [nvcc, "-std=c++17", "-O1", "-x", "cu", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)]
    asan = ["-Xcompiler=-fsanitize=address,-fno-omit-frame-pointer", "-lasan"]
    build = subprocess.run(base[:1] + asan + base[1:], capture_output=True, text=True)
    if build.returncode != 0:  # no AddressSanitizer runtime: build without it
        build = subprocess.run(base, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert " 0 failures" in run.stdout


# --------------------------------------------------------------------------
# On a GPU


@pytest.fixture(autouse=True)
def _no_tf32():
    # Compare with the stock sequence in true float32.
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def stock(x, w, b, padding, pool):
    return F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=padding)), pool, pool)


def make(shape_x, shape_w, bias=True, dtype=torch.float32, device="cuda", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape_x, generator=gen, dtype=dtype)
    w = torch.randn(shape_w, generator=gen, dtype=dtype) / (shape_w[1] * shape_w[2] * shape_w[3]) ** 0.5
    b = torch.randn(shape_w[0], generator=gen, dtype=dtype) * 0.1 if bias else None
    return x.to(device), w.to(device), (b.to(device) if b is not None else None)


# (input shape, weight shape, padding, pool, bias)
SHAPES = [
    ((1, 1, 28, 28), (6, 1, 5, 5), (0, 0), 2, True),  # seed block 1
    ((7, 1, 28, 28), (6, 1, 5, 5), (0, 0), 2, True),
    ((64, 1, 28, 28), (6, 1, 5, 5), (0, 0), 2, True),
    ((1, 6, 12, 12), (12, 6, 5, 5), (0, 0), 2, True),  # seed block 2
    ((5, 6, 12, 12), (12, 6, 5, 5), (0, 0), 2, True),
    ((64, 6, 12, 12), (12, 6, 5, 5), (0, 0), 2, True),
    ((0, 1, 28, 28), (6, 1, 5, 5), (0, 0), 2, True),  # batch 0
    ((3, 3, 13, 11), (5, 3, 3, 3), (0, 0), 2, True),  # odd sizes
    ((2, 2, 9, 10), (4, 2, 3, 3), (1, 2), 2, True),  # padding
    ((2, 3, 10, 12), (7, 3, 2, 5), (1, 0), 2, False),  # rectangular kernel, no bias
    ((2, 2, 11, 9), (3, 2, 4, 2), (0, 1), 3, True),  # pool 3
    ((3, 4, 8, 8), (5, 4, 3, 3), (1, 1), 1, True),  # pool 1
    ((2, 2, 20, 19), (3, 2, 3, 2), (1, 1), 16, True),  # pool > 15: int32 indices
    ((2, 16, 40, 40), (8, 16, 3, 3), (1, 1), 2, True),  # too big for the fast path
    ((1, 64, 9, 9), (64, 64, 3, 3), (0, 0), 2, True),  # filter bank in channel groups
]


def _ids(s):
    x, w, p, pool, b = s
    return f"x{list(x)}-w{list(w)}-p{list(p)}-pool{pool}-{'b' if b else 'nob'}"


@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=[_ids(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_stock_forward_and_backward(shape, dtype):
    xs, ws, pad, pool, has_b = shape
    x, w, b = make(xs, ws, has_b, dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    out = fmnist_ext.conv_relu_maxpool2d(x, w, b, pad, pool)
    ref = stock(x, w, b, pad, pool)
    assert out.shape == ref.shape and out.device == x.device and out.is_contiguous()
    torch.testing.assert_close(out, ref, **tol)
    if x.shape[0] == 0:
        return
    g = torch.randn_like(ref)
    params = [x, w] + ([b] if b is not None else [])
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol)


@gpu
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_non_contiguous_inputs(layout):
    x, w, b = make((4, 6, 12, 12), (12, 6, 5, 5), True, torch.float64)
    if layout == "channels_last":
        xin = x.to(memory_format=torch.channels_last)
        win = w.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        xin = torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]
        win = w
    else:
        xin = x.transpose(2, 3).contiguous().transpose(2, 3)
        win = w.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xin.is_contiguous()
    out, idx = op(xin, win, b, [0, 0], 2)
    ref_out, ref_idx = op(x, w, b, [0, 0], 2)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)
    g = torch.randn_like(out).transpose(2, 3).contiguous().transpose(2, 3)
    got = bwd_op(g, xin, win, idx, [0, 0], 2, [True, True, True])
    want = bwd_op(g.contiguous(), x, w, idx, [0, 0], 2, [True, True, True])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@gpu
@pytest.mark.parametrize(
    "xs,ws,pad,pool",
    [((2, 1, 8, 8), (3, 1, 3, 3), (0, 0), 2), ((2, 2, 7, 9), (3, 2, 2, 3), (1, 0), 3),
     ((1, 2, 6, 6), (2, 2, 3, 3), (1, 1), 1), ((2, 6, 12, 12), (12, 6, 5, 5), (0, 0), 2)],
)
def test_gradcheck_float64(xs, ws, pad, pool):
    x, w, b = make(xs, ws, True, torch.float64)
    for t in (x, w, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: fmnist_ext.conv_relu_maxpool2d(x, w, b, pad, pool), (x, w, b),
        eps=1e-6, atol=1e-5, rtol=1e-4)


@gpu
@pytest.mark.parametrize("pool", [2, 3, 16])
def test_opcheck(pool):
    xs = (2, 2, 20, 19) if pool == 16 else (2, 3, 11, 10)
    x, w, b = make(xs, (4, xs[1], 3, 3), True, torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    torch.library.opcheck(op.default, (x, w, b, [1, 1], pool))
    torch.library.opcheck(op.default, (x.detach(), w.detach(), None, [0, 1], pool))
    out, idx = op(x.detach(), w.detach(), b.detach(), [1, 1], pool)
    g = torch.randn_like(out)
    torch.library.opcheck(bwd_op.default, (g, x.detach(), w.detach(), idx, [1, 1], pool, [True, True, True]))
    torch.library.opcheck(bwd_op.default, (g, x.detach(), w.detach(), idx, [1, 1], pool, [False, True, False]))


@gpu
def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    x, w, b = make((8, 1, 28, 28), (6, 1, 5, 5), True, torch.float32)
    w2 = make((1, 6, 12, 12), (12, 6, 5, 5), True, torch.float32)[1:]

    def f(x, w, b, w2, b2):
        y = fmnist_ext.conv_relu_maxpool2d(x, w, b, 0, 2)
        return fmnist_ext.conv_relu_maxpool2d(y, w2, b2, 0, 2)

    params = [w, b, *w2]
    for p in params:
        p.requires_grad_(True)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, *params)
    ref = f(x, *params)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out.square().sum(), params)
    want = torch.autograd.grad(ref.square().sum(), params)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@gpu
def test_bad_inputs():
    x, w, b = make((2, 1, 28, 28), (6, 1, 5, 5), True, torch.float32)
    cases = [
        (ValueError, "same device", lambda: op(x, w.cpu(), b, [0, 0], 2)),
        (ValueError, "same device", lambda: op(x.cpu(), w, b, [0, 0], 2)),
        (ValueError, "bias", lambda: op(x, w, b.cpu(), [0, 0], 2)),
        (ValueError, "same device", lambda: fmnist_ext.conv_relu_maxpool2d(x, w.cpu(), b)),
        (TypeError, "float32 or float64", lambda: op(x.half(), w.half(), b.half(), [0, 0], 2)),
        (TypeError, "dtype of input", lambda: op(x, w.double(), b, [0, 0], 2)),
        (ValueError, "4-D", lambda: op(x[0], w, b, [0, 0], 2)),
        (ValueError, "in-channels", lambda: op(x, w.repeat(1, 2, 1, 1), b, [0, 0], 2)),
        (ValueError, "pool", lambda: op(x, w, b, [0, 0], 0)),
        (ValueError, "pool window", lambda: op(x, w, b, [0, 0], 25)),
        (ValueError, "non-negative", lambda: op(x, w, b, [-1, 0], 2)),
        (ValueError, "larger than the padded input", lambda: op(x[:, :, :3, :3], w, b, [0, 0], 2)),
    ]
    out, idx = op(x, w, b, [0, 0], 2)
    g = torch.ones_like(out)
    cases += [
        (ValueError, "grad_output", lambda: bwd_op(g[:1], x, w, idx, [0, 0], 2, [True, True, True])),
        (TypeError, "indices of dtype", lambda: bwd_op(g, x, w, idx.int(), [0, 0], 2, [True, True, True])),
        (ValueError, "device", lambda: bwd_op(g, x, w, idx.cpu(), [0, 0], 2, [True, True, True])),
        (ValueError, "device", lambda: bwd_op(g.cpu(), x, w, idx, [0, 0], 2, [True, True, True])),
    ]
    if torch.cuda.device_count() > 1:
        cases.append((ValueError, "same device", lambda: op(x, w.to("cuda:1"), b, [0, 0], 2)))
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()


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
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)  # atomics: summation order


@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=[_ids(s) for s in SHAPES])
def test_cuda_equals_cpu_kernels_float64(shape):
    xs, ws, pad, pool, has_b = shape
    x, w, b = make(xs, ws, has_b, torch.float64, device="cpu", seed=3)
    assert "cpu" in _library.COMPILED_DEVICE_TYPES
    out_c, idx_c = op(x, w, b, list(pad), pool)
    out_g, idx_g = op(x.cuda(), w.cuda(), b.cuda() if b is not None else None, list(pad), pool)
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-13, atol=1e-13)
    assert torch.equal(idx_g.cpu(), idx_c)
    g = torch.randn(out_c.shape, dtype=torch.float64)
    mask = [True, True, has_b]
    got = bwd_op(g.cuda(), x.cuda(), w.cuda(), idx_g, list(pad), pool, mask)
    want = bwd_op(g, x, w, idx_c, list(pad), pool, mask)
    for a, e in zip(got, want):
        assert a.shape == e.shape
        torch.testing.assert_close(a.cpu(), e, rtol=1e-11, atol=1e-11)


@gpu
def test_nan_and_ties_follow_the_cpu_rules():
    x, w, b = make((3, 2, 10, 10), (4, 2, 3, 3), True, torch.float64, device="cpu", seed=5)
    x = (x * 4).round() / 4  # exact sums: many ties between window positions
    w = (w * 4).round() / 4
    x[0, 0, 3, 3] = float("nan")
    x[1, 1, 5, 6] = float("nan")
    out_c, idx_c = op(x, w, b, [1, 1], 2)
    out_g, idx_g = op(x.cuda(), w.cuda(), b.cuda(), [1, 1], 2)
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx_g.cpu(), idx_c)


@gpu
@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True],
                                  [False, True, True], [False, False, False]])
def test_backward_output_mask(mask):
    x, w, b = make((3, 6, 12, 12), (12, 6, 5, 5), True, torch.float64)
    out, idx = op(x, w, b, [0, 0], 2)
    g = torch.randn_like(out)
    got = bwd_op(g, x, w, idx, [0, 0], 2, mask)
    full = bwd_op(g, x, w, idx, [0, 0], 2, [True, True, True])
    for want_it, a, e in zip(mask, got, full):
        if want_it:
            torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
        else:
            assert a.shape == (0,)


@gpu
def test_batch_of_60000_images_in_one_call():
    x, w, b = make((60000, 1, 28, 28), (6, 1, 5, 5), True, torch.float32)
    w.requires_grad_(True)
    b.requires_grad_(True)
    out = fmnist_ext.conv_relu_maxpool2d(x, w, b, 0, 2)
    ref = stock(x, w, b, 0, 2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ref) / 1000
    got = torch.autograd.grad(out, [w, b], g)
    want = torch.autograd.grad(ref, [w, b], g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
    # block 2 at the same batch, with grad_input
    x2, w2, b2 = make((60000, 6, 12, 12), (12, 6, 5, 5), True, torch.float32, seed=1)
    x2.requires_grad_(True)
    out2 = fmnist_ext.conv_relu_maxpool2d(x2, w2, b2, 0, 2)
    ref2 = stock(x2, w2, b2, 0, 2)
    torch.testing.assert_close(out2, ref2, rtol=1e-4, atol=1e-5)
    g2 = torch.randn_like(ref2)
    torch.testing.assert_close(torch.autograd.grad(out2, x2, g2)[0], torch.autograd.grad(ref2, x2, g2)[0],
                               rtol=1e-4, atol=1e-5)


@gpu
def test_module_on_cuda_and_current_stream():
    block = fmnist_ext.FusedConvReLUMaxPool2d(1, 6, 5).cuda()
    x = torch.randn(16, 1, 28, 28, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = block(x)
        y.sum().backward()
    s.synchronize()
    torch.testing.assert_close(y, stock(x, block.weight, block.bias, 0, 2))
    assert block.weight.grad is not None and block.bias.grad is not None
