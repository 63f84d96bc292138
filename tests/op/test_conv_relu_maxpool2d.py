"""The fused operator against the stock conv2d -> relu -> max_pool2d sequence,
on every device (op_helpers.cpu_and_cuda): forward, gradients, layouts, ties,
NaN, the backward's output mask, gradcheck, the module."""

import pytest
import torch
import torch.nn.functional as F
from op_helpers import (
    BWD,
    GRID,
    OP,
    assert_matches_stock,
    cpu_and_cuda,
    cpu_isas_and_cuda,
    fused,
    make_case,
    pair,
    requires_compiled_cpu,
    stock,
    tolerances,
)

import fmnist_ext


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,cin,h,w,cout,k,padding,pool", GRID)
@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_matches_stock(device, n, cin, h, w, cout, k, padding, pool, bias, dtype):
    x, wt, b = make_case(n, cin, h, w, cout, k, dtype=dtype, bias=bias, device=device)
    y = assert_matches_stock(x, wt, b, padding, pool, dtype, large_batch_rule=True)
    kh, kw = pair(k)
    ph, pw = pair(padding)
    assert y.shape == (n, cout, (h + 2 * ph - kh + 1) // pool, (w + 2 * pw - kw + 1) // pool)
    assert y.is_contiguous() and y.device == x.device


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_uses_compiled_kernel_and_saves_uint8_indices(device):
    x, wt, b = make_case(2, 1, 28, 28, 6, 5, requires_grad=False, device=device)
    out, idx = OP(x, wt, b, [0, 0], 2)
    assert idx.dtype == torch.uint8 and idx.shape == out.shape and idx.device == x.device
    assert int(idx.max()) <= 4  # positions 0..3, or 4 = no gradient
    # The no-gradient marker is exactly where the output is 0 (ReLU'd window).
    assert torch.equal(idx == 4, out == 0)
    _, idx16 = OP(torch.randn(1, 1, 40, 40, device=device), torch.randn(1, 1, 3, 3, device=device), None, [0, 0], 16)
    assert idx16.dtype == torch.int32


LAYOUTS = ["channels_last", "sliced", "transposed"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_non_contiguous_inputs_match_stock(device, layout):
    x, wt, b = make_case(3, 4, 14, 14, 5, 3, device=device)
    with torch.no_grad():
        if layout == "channels_last":
            x2 = x.to(memory_format=torch.channels_last)
            w2 = wt.to(memory_format=torch.channels_last)
        elif layout == "sliced":
            x2 = torch.randn(3, 8, 14, 28).to(device)[:, ::2, :, ::2]
            w2 = torch.randn(5, 4, 3, 6).to(device)[..., ::2]
        else:
            x2 = torch.randn(3, 4, 14, 14).to(device).transpose(2, 3)
            w2 = wt.detach().transpose(2, 3)
    assert not x2.is_contiguous()
    x2.requires_grad_()
    w2.requires_grad_()
    assert_matches_stock(x2, w2, b, 1, 2, torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_non_contiguous_inputs_equal_contiguous(device, layout):
    # The same numbers in another layout give the same winners and bits; the
    # backward takes a non-contiguous grad_output too.
    x, w, b = make_case(4, 6, 12, 12, 12, 5, dtype=torch.float64, requires_grad=False, device=device)
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
    out, idx = OP(xin, win, b, [0, 0], 2)
    ref_out, ref_idx = OP(x, w, b, [0, 0], 2)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)
    g = torch.randn_like(out).transpose(2, 3).contiguous().transpose(2, 3)
    got = BWD(g, xin, win, idx, [0, 0], 2, [True, True, True])
    want = BWD(g.contiguous(), x, w, idx, [0, 0], 2, [True, True, True])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", cpu_isas_and_cuda())
@pytest.mark.parametrize(("cin", "size", "cout"), [(1, 28, 6), (6, 12, 12), (3, 13, 5)])
def test_unit_column_stride_views_equal_contiguous(device, cin, size, cout):
    # Views with unit column stride but longer rows and a channel gap (the CPU
    # forward reads such inputs in place, without copying, when no padding is
    # asked for and the rows are wide enough for its vector loads: the model's
    # two block shapes are the first two cases): same bits as the contiguous
    # copy, and each element read from the right place (the margins hold NaN).
    torch.manual_seed(0)
    big = torch.full((3, 2 * cin, size + 3, size + 5), float("nan"), device=device)
    x = big[:, ::2, 1 : 1 + size, 2 : 2 + size]
    x.copy_(torch.randn(3, cin, size, size, device=device))
    assert x.stride(3) == 1 and not x.is_contiguous()
    w = torch.randn(cout, cin, 5, 5, device=device)
    b = torch.randn(cout, device=device)
    out, idx = OP(x, w, b, [0, 0], 2)
    ref_out, ref_idx = OP(x.contiguous(), w, b, [0, 0], 2)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)
    stock = F.max_pool2d(F.relu(F.conv2d(x.contiguous(), w, b)), 2)
    torch.testing.assert_close(out, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_ties_first_maximum_wins(device):
    # A 1x1 identity filter makes the convolution output equal the input; small
    # integers make many windows hold several equal maxima (and many <= 0).
    x = torch.randint(-2, 3, (4, 1, 12, 12)).double().to(device).requires_grad_()
    wt = torch.ones(1, 1, 1, 1, dtype=torch.double, device=device, requires_grad=True)
    b = torch.zeros(1, dtype=torch.double, device=device, requires_grad=True)
    assert_matches_stock(x, wt, b, 0, 2, torch.float64)
    assert_matches_stock(x, wt, b, 0, 3, torch.float64)


@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_all_negative_passes_no_gradient(device):
    x = -torch.rand(2, 1, 8, 8).add(0.1)
    x = x.to(device).requires_grad_()
    wt = torch.ones(1, 1, 1, 1, device=device, requires_grad=True)
    y = fmnist_ext.conv_relu_maxpool2d(x, wt, None, 0, 2)
    assert torch.count_nonzero(y) == 0
    gx, gw = torch.autograd.grad(y, (x, wt), torch.ones_like(y))
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gw) == 0


@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_nan_and_inf_propagate_like_stock(device):
    x, wt, b = make_case(2, 1, 10, 10, 3, 3, dtype=torch.float64, requires_grad=False, device=device)
    x[0, 0, 4, 4] = float("nan")
    x[1, 0, 2, 7] = float("inf")
    x.requires_grad_()
    y = fused(x, wt, b, 0, 2)
    y_ref = stock(x, wt, b, 0, 2)
    torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=1e-12, atol=1e-12)
    assert torch.isnan(y).any() and torch.isinf(y).any()
    # grad_input: the winners' gradients flow back like stock.
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(gx, gx_ref, equal_nan=True, rtol=1e-12, atol=1e-12)


MASKS = [
    [True, True, True],
    [False, True, True],  # the first layer of a network: no grad_input
    [True, False, False],
    [False, True, False],
    [False, False, True],
    [False, False, False],
]


@pytest.mark.parametrize("mask", MASKS, ids=["".join("1" if m else "0" for m in mask) for mask in MASKS])
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_only_requested_gradients_are_computed(device, mask):
    # The backward op computes exactly the gradients its output mask asks
    # for: the others are empty, the asked ones equal the full backward's
    # and stock's.
    x, wt, b = make_case(3, 6, 12, 12, 12, 5, dtype=torch.float64, device=device)
    out, idx = OP(x.detach(), wt.detach(), b.detach(), [0, 0], 2)
    g = torch.randn_like(out)
    got = BWD(g, x.detach(), wt.detach(), idx, [0, 0], 2, mask)
    full = BWD(g, x.detach(), wt.detach(), idx, [0, 0], 2, [True, True, True])
    want = torch.autograd.grad(stock(x, wt, b, 0, 2), (x, wt, b), g)
    for name, asked, a, f, s in zip(("grad_input", "grad_weight", "grad_bias"), mask, got, full, want):
        if asked:
            assert a.shape == s.shape, name
            torch.testing.assert_close(a, f, rtol=0, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
            torch.testing.assert_close(a, s, **tolerances(torch.float64), msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert a.shape == (0,), name


# (n, cin, h, w, cout, kernel, padding, pool, bias)
GRADCHECK_CASES = [
    pytest.param(2, 2, 9, 8, 3, 3, (1, 0), 2, True, id="padding-pool2"),
    pytest.param(2, 2, 9, 8, 3, 3, (1, 0), 2, False, id="padding-pool2-nobias"),
    pytest.param(2, 2, 9, 8, 3, 3, (1, 0), 3, True, id="padding-pool3"),
    pytest.param(2, 2, 9, 8, 3, 3, (1, 0), 3, False, id="padding-pool3-nobias"),
    pytest.param(2, 1, 8, 8, 3, 3, 0, 2, True, id="one-channel"),
    pytest.param(2, 2, 7, 9, 3, (2, 3), (1, 0), 3, True, id="rect-kernel-pool3"),
    pytest.param(1, 2, 6, 6, 2, 3, 1, 1, True, id="pool1"),
    pytest.param(2, 6, 12, 12, 12, 5, 0, 2, True, id="seed-block2"),
]


@pytest.mark.parametrize("n,cin,h,w,cout,k,padding,pool,bias", GRADCHECK_CASES)
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_gradcheck(device, n, cin, h, w, cout, k, padding, pool, bias):
    # The compiled kernels' backward against finite differences (the device
    # parameter requires them: under the fallback this would check PyTorch's
    # own conv2d and max_pool2d instead). Random reals on every device:
    # finite differences need points away from ties.
    x, wt, b = make_case(n, cin, h, w, cout, k, dtype=torch.float64, bias=bias, device=device, exact=False)
    args = (x, wt) if b is None else (x, wt, b)
    assert fmnist_ext.uses_compiled_kernels(device)
    assert torch.autograd.gradcheck(
        lambda x, w, b=None: fused(x, w, b, padding, pool), args, eps=1e-6, atol=1e-6, rtol=1e-4
    )


@requires_compiled_cpu
def test_multithreaded_weight_gradient_reduction_matches_stock_for_any_thread_count():
    # CPU only: the per-thread partial sums of grad_weight must add up to
    # stock's values whatever the thread count.
    x, wt, b = make_case(37, 3, 12, 12, 4, 5, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert_matches_stock(x, wt, b, 0, 2, torch.float64)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", cpu_and_cuda(compiled=False))
def test_module_state_dict_and_init_match_conv2d(device):
    torch.manual_seed(123)
    conv = torch.nn.Conv2d(6, 12, 5)
    torch.manual_seed(123)
    block = fmnist_ext.FusedConvReLUMaxPool2d(6, 12, 5)
    assert block.state_dict().keys() == conv.state_dict().keys()
    for key, value in conv.state_dict().items():
        assert torch.equal(block.state_dict()[key], value), key
    other = fmnist_ext.FusedConvReLUMaxPool2d(6, 12, 5).to(device)
    other.load_state_dict(conv.state_dict())
    conv = conv.to(device)
    x = torch.randn(3, 6, 12, 12, device=device)
    torch.testing.assert_close(other(x), F.max_pool2d(F.relu(conv(x)), 2), rtol=1e-4, atol=1e-5)
    no_bias = fmnist_ext.FusedConvReLUMaxPool2d(1, 6, (5, 3), padding=(1, 2), bias=False, pool=3)
    assert no_bias.bias is None and no_bias.weight.shape == (6, 1, 5, 3)
    assert "pool=3" in repr(no_bias)
