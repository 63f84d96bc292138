"""The per-channel moments op (fmnist_ext/op/moments.py, csrc/cpu/channel_moments_cpu.cpp):
values against torch.var_mean(correction=0), gradients, the op contract
(opcheck), autodiff modes and bad inputs. CPU only: the op has no CUDA kernel."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from op_helpers import requires_compiled_cpu

from fmnist_ext.op import moments
from fmnist_ext.op.moments import channel_moments

pytestmark = requires_compiled_cpu

SHAPES = [
    pytest.param((16, 6, 12, 12), id="seed-bn1"),
    pytest.param((3, 5, 7, 9), id="odd-4d"),
    pytest.param((1, 3, 1, 2), id="tiny-4d"),
    pytest.param((1000, 6, 12, 12), id="batch-1000"),
    pytest.param((37, 120), id="seed-bn2-odd"),
    pytest.param((5, 1), id="one-channel-2d"),
    pytest.param((2, 3), id="tiny-2d"),
]


def _ref(x):
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    var, mean = torch.var_mean(x.double(), dims, correction=0)
    return mean, var


def test_the_op_runs_the_compiled_kernel_on_cpu():
    assert moments.has_compiled_kernel("cpu")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(moments.BACKWARD_OP, "CPU")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_var_mean(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3 + 0.5
    mean, var = channel_moments(x)
    assert mean.shape == var.shape == (shape[1],) and mean.dtype == var.dtype == dtype
    rm, rv = _ref(x)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(mean.double(), rm, **tol)
    torch.testing.assert_close(var.double(), rv, **tol)


def test_large_mean_small_spread_keeps_the_variance():
    # E[x^2] - E[x]^2 in float32 would lose every digit here; float64 shifted sums keep it.
    x = 1000.0 + 1e-2 * torch.randn(64, 4, 10, 10)
    _, var = channel_moments(x)
    _, rv = _ref(x)
    torch.testing.assert_close(var.double(), rv, rtol=1e-4, atol=0)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded"])
def test_non_contiguous_inputs(layout):
    base = torch.randn(9, 4, 8, 10)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = base[::2, :, 1:, ::3]
    else:
        x = torch.randn(1, 4, 1, 1).expand(5, 4, 3, 3)
    for got, want in zip(channel_moments(x), _ref(x)):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_nan_and_inf_are_not_hidden():
    x = torch.randn(4, 3, 5, 5)
    x[2, 1, 3, 3] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    mean, var = channel_moments(x)
    assert mean[0].isfinite() and var[0].isfinite()
    assert mean[1].isnan() and var[1].isnan()
    assert not var[2].isfinite()


def test_empty_batch_is_nan_like_var_mean_and_no_channels_is_empty():
    mean, var = channel_moments(torch.empty(0, 3, 4, 4))
    assert mean.shape == (3,) and mean.isnan().all() and var.isnan().all()
    mean, var = channel_moments(torch.empty(5, 0))
    assert mean.shape == var.shape == (0,)
    x = torch.empty(0, 3, 4, 4, requires_grad=True)
    m, v = channel_moments(x)
    (m.nan_to_num().sum() + v.nan_to_num().sum()).backward()
    assert x.grad.shape == x.shape


def test_same_result_for_any_thread_count():
    x = torch.randn(700, 6, 12, 12)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = channel_moments(x)
        torch.set_num_threads(max(2, old))
        many = channel_moments(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 5)])
def test_gradcheck_and_gradgradcheck_float64(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(channel_moments, (x,))
    assert torch.autograd.gradgradcheck(channel_moments, (x,))
    # only one of the two outputs used: the other gradient is absent (None), not zero-filled
    assert torch.autograd.gradcheck(lambda t: channel_moments(t)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: channel_moments(t)[1], (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_var_mean(dtype):
    x = torch.randn(33, 6, 12, 12, dtype=dtype, requires_grad=True)
    gm, gv = torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)
    mean, var = channel_moments(x)
    (got,) = torch.autograd.grad((mean * gm).sum() + (var * gv).sum(), x)
    xr = x.detach().double().requires_grad_()
    rm, rv = _ref(xr)
    (want,) = torch.autograd.grad((rm * gm.double()).sum() + (rv * gv.double()).sum(), xr)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.double(), want, **tol)


def test_backward_op_with_an_absent_gradient():
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    mean = x.mean((0, 2, 3))
    g = torch.randn(4, dtype=torch.float64)
    bwd = torch.ops.fmnist_ext._channel_moments_backward
    torch.testing.assert_close(bwd(g, None, x, mean), moments.backward_formula(g, None, x, mean))
    torch.testing.assert_close(bwd(None, g, x, mean), moments.backward_formula(None, g, x, mean))
    assert torch.equal(bwd(None, None, x, mean), torch.zeros_like(x))
    # the formula itself, written out
    m = 6 * 3 * 3
    want = g.view(1, -1, 1, 1) / m + g.view(1, -1, 1, 1) * 2 * (x - mean.view(1, -1, 1, 1)) / m
    torch.testing.assert_close(bwd(g, g, x, mean), want)


def test_forward_mode_ad_matches_var_mean():
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        mean, var = channel_moments(fwAD.make_dual(x, t))
        got = [fwAD.unpack_dual(o).tangent for o in (mean, var)]
    _, want = torch.func.jvp(lambda a: _ref(a), (x,), (t,))
    assert got[0] is not None and got[1] is not None
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    torch.library.opcheck(torch.ops.fmnist_ext.channel_moments, (x,))
    torch.library.opcheck(torch.ops.fmnist_ext.channel_moments, (x.requires_grad_(),))
    c = shape[1]
    mean = x.detach().mean([d for d in range(x.dim()) if d != 1])
    g = torch.randn(c, dtype=dtype)
    torch.library.opcheck(torch.ops.fmnist_ext._channel_moments_backward, (g, g, x.detach(), mean))
    torch.library.opcheck(torch.ops.fmnist_ext._channel_moments_backward, (None, g, x.detach(), mean))


def test_torch_compile_fullgraph():
    x = torch.randn(8, 6, 12, 12, requires_grad=True)
    f = torch.compile(lambda t: channel_moments(t), fullgraph=True, backend="aot_eager")
    mean, var = f(x)
    torch.testing.assert_close((mean, var), channel_moments(x))
    (var.sum() + mean.sum()).backward()
    assert x.grad is not None and x.grad.isfinite().all()


BAD = [
    (lambda: [1.0, 2.0], TypeError, "expected x to be a Tensor"),
    (lambda: torch.randn(3, 4, 5), ValueError, "x to be a 2-D .* or 4-D"),
    (lambda: torch.randn(3), ValueError, "x to be a 2-D .* or 4-D"),
    (lambda: torch.randint(0, 5, (3, 4)), TypeError, "x to be float32 or float64"),
    (lambda: torch.randn(3, 4, dtype=torch.bfloat16), TypeError, "x to be float32 or float64"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_inputs_name_the_argument(make, exc, match):
    x = make()
    with pytest.raises(exc, match=match):
        channel_moments(x)
    if isinstance(x, torch.Tensor):  # the C++ kernel checks the same for a direct call
        with pytest.raises(exc, match=match):
            torch.ops.fmnist_ext.channel_moments(x)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (lambda x, m: (m[:2], None, x, m), ValueError, "grad_mean to be a 1-D tensor of length C = 3"),
        (lambda x, m: (None, m.view(1, 3), x, m), ValueError, "grad_var to be a 1-D tensor"),
        (lambda x, m: (None, m.float(), x, m), TypeError, "grad_var to have the dtype of x"),
        (lambda x, m: (m, m, x, m[1:]), ValueError, "mean to be a 1-D tensor of length C = 3"),
        (lambda x, m: (m, m, x[0], m), ValueError, "x to be a 2-D .* or 4-D"),
    ],
)
def test_backward_op_bad_inputs_name_the_argument(args, exc, match):
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    m = x.mean((0, 2, 3))
    a = args(x, m)
    with pytest.raises(exc, match=match):
        torch.ops.fmnist_ext._channel_moments_backward(*a)
    # the fake kernel says the same
    with pytest.raises(exc, match=match), torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fa = [None if t is None else mode.from_tensor(t) for t in a]
        torch.ops.fmnist_ext._channel_moments_backward(*fa)


def test_other_devices_run_var_mean():
    x = torch.randn(3, 4, 5, 5, device="meta")
    mean, var = channel_moments(x)  # no compiled kernel there: the definition runs
    assert mean.shape == var.shape == (4,) and mean.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_add_adds_in_place(dtype, layout):
    x = torch.randn(5, 3, 4, 6, dtype=dtype)
    mean = x.mean((0, 2, 3))
    gm, gv = torch.randn(3, dtype=dtype), torch.randn(3, dtype=dtype)
    start = torch.randn_like(x)
    if layout == "channels_last":
        start = start.contiguous(memory_format=torch.channels_last)
    grad_x = start.clone()
    ptr = grad_x.data_ptr()
    torch.ops.fmnist_ext._channel_moments_backward_add_(grad_x, gm, gv, x, mean)
    assert grad_x.data_ptr() == ptr  # in place
    want = start + torch.ops.fmnist_ext._channel_moments_backward(gm, gv, x, mean)
    torch.testing.assert_close(grad_x, want)
    grad_x = start.clone()
    torch.ops.fmnist_ext._channel_moments_backward_add_(grad_x, None, None, x, mean)
    assert torch.equal(grad_x, start)


def test_backward_add_opcheck_and_bad_grad_x():
    x = torch.randn(4, 3, 5, 5)
    mean, g = x.mean((0, 2, 3)), torch.randn(3)
    op = torch.ops.fmnist_ext._channel_moments_backward_add_
    torch.library.opcheck(op, (torch.randn_like(x), g, g, x, mean))
    with pytest.raises(ValueError, match="grad_x of x's shape"):
        op(torch.randn(4, 3, 5, 4), g, g, x, mean)
    with pytest.raises(TypeError, match="grad_x to have the dtype of x"):
        op(torch.randn_like(x, dtype=torch.float64), g, g, x, mean)
    with pytest.raises(ValueError, match="grad_var to be a 1-D tensor of length C = 3"):
        op(torch.randn_like(x), g, g[:2], x, mean)


def test_torch_func_gradients_are_refused_and_vmap_loops():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"channel_moments: gradients under torch\.func"):
        torch.func.grad(lambda t: channel_moments(t)[1].sum())(x)
    xs = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64)
    means, variances = torch.vmap(channel_moments)(xs)  # PyTorch's per-sample fallback
    for i in range(2):
        rm, rv = _ref(xs[i])
        torch.testing.assert_close(means[i], rm)
        torch.testing.assert_close(variances[i], rv)
