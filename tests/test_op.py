"""The fused operator against the stock conv2d -> relu -> max_pool2d sequence."""

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_compiled_cpu
from op_helpers import assert_matches_stock, fused, make_case, pair, stock

import fmnist_ext

# (n, cin, h, w, cout, kernel, padding, pool)
GRID = [
    pytest.param(4, 1, 28, 28, 6, 5, 0, 2, id="seed-block1"),
    pytest.param(4, 6, 12, 12, 12, 5, 0, 2, id="seed-block2"),
    pytest.param(3, 2, 13, 11, 4, 3, 0, 2, id="odd-sizes-floor"),
    pytest.param(2, 3, 10, 10, 5, 3, (1, 2), 2, id="padding"),
    pytest.param(2, 2, 9, 12, 3, (2, 4), 0, 3, id="rect-kernel-pool3"),
    pytest.param(2, 2, 7, 7, 7, 1, 0, 1, id="pool1-1x1"),
    pytest.param(1, 1, 40, 40, 2, 3, 0, 16, id="pool16-int32-index"),
    pytest.param(2, 1, 16, 20, 3, (3, 11), 0, 2, id="wide-kernel"),
    pytest.param(1, 2, 20, 100, 13, 3, 1, 2, id="wide-image-13-channels"),
    pytest.param(1, 1, 28, 28, 6, 5, 0, 2, id="batch1"),
    pytest.param(0, 1, 28, 28, 6, 5, 0, 2, id="batch0"),
    pytest.param(2, 3, 5, 5, 2, 5, 0, 1, id="kernel-equals-input"),
    pytest.param(2, 2, 3, 3, 2, 5, 2, 3, id="kernel-larger-than-input-padded"),
]


@requires_compiled_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,cin,h,w,cout,k,padding,pool", GRID)
def test_matches_stock(cpu_isa, n, cin, h, w, cout, k, padding, pool, bias, dtype):
    x, wt, b = make_case(n, cin, h, w, cout, k, dtype=dtype, bias=bias)
    y = assert_matches_stock(x, wt, b, padding, pool, dtype)
    kh, kw = pair(k)
    ph, pw = pair(padding)
    assert y.shape == (n, cout, (h + 2 * ph - kh + 1) // pool, (w + 2 * pw - kw + 1) // pool)
    assert y.is_contiguous()


@requires_compiled_cpu
def test_uses_compiled_kernel_and_saves_uint8_indices():
    x, wt, b = make_case(2, 1, 28, 28, 6, 5, requires_grad=False)
    out, idx = torch.ops.fmnist_ext.conv_relu_maxpool2d(x, wt, b, [0, 0], 2)
    assert idx.dtype == torch.uint8 and idx.shape == out.shape
    assert int(idx.max()) <= 4  # positions 0..3, or 4 = no gradient
    # The no-gradient marker is exactly where the output is 0 (ReLU'd window).
    assert torch.equal(idx == 4, out == 0)
    _, idx16 = torch.ops.fmnist_ext.conv_relu_maxpool2d(
        torch.randn(1, 1, 40, 40), torch.randn(1, 1, 3, 3), None, [0, 0], 16
    )
    assert idx16.dtype == torch.int32


@requires_compiled_cpu
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_non_contiguous_inputs(cpu_isa, layout):
    x, wt, b = make_case(3, 4, 14, 14, 5, 3)
    with torch.no_grad():
        if layout == "channels_last":
            x2 = x.to(memory_format=torch.channels_last)
            w2 = wt.to(memory_format=torch.channels_last)
        elif layout == "sliced":
            x2 = torch.randn(3, 8, 14, 28)[:, ::2, :, ::2]
            w2 = torch.randn(5, 4, 3, 6)[..., ::2]
        else:
            x2 = torch.randn(3, 4, 14, 14).transpose(2, 3)
            w2 = wt.detach().transpose(2, 3)
    assert not x2.is_contiguous()
    x2.requires_grad_()
    w2.requires_grad_()
    assert_matches_stock(x2, w2, b, 1, 2, torch.float32)


@requires_compiled_cpu
def test_ties_first_maximum_wins(cpu_isa):
    # A 1x1 identity filter makes the convolution output equal the input; small
    # integers make many windows hold several equal maxima (and many <= 0).
    x = torch.randint(-2, 3, (4, 1, 12, 12)).double().requires_grad_()
    wt = torch.ones(1, 1, 1, 1, dtype=torch.double, requires_grad=True)
    b = torch.zeros(1, dtype=torch.double, requires_grad=True)
    assert_matches_stock(x, wt, b, 0, 2, torch.float64)
    assert_matches_stock(x, wt, b, 0, 3, torch.float64)


@requires_compiled_cpu
def test_all_negative_passes_no_gradient(cpu_isa):
    x = -torch.rand(2, 1, 8, 8).add(0.1)
    x.requires_grad_()
    wt = torch.ones(1, 1, 1, 1, requires_grad=True)
    y = fmnist_ext.conv_relu_maxpool2d(x, wt, None, 0, 2)
    assert torch.count_nonzero(y) == 0
    gx, gw = torch.autograd.grad(y, (x, wt), torch.ones_like(y))
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gw) == 0


@requires_compiled_cpu
def test_nan_and_inf_propagate_like_stock(cpu_isa):
    x, wt, b = make_case(2, 1, 10, 10, 3, 3, dtype=torch.float64, requires_grad=False)
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


@requires_compiled_cpu
def test_only_requested_gradients_are_computed():
    x, wt, b = make_case(2, 1, 28, 28, 6, 5)
    x.requires_grad_(False)
    y = fmnist_ext.conv_relu_maxpool2d(x, wt, b)
    g = torch.randn_like(y)
    out, idx = torch.ops.fmnist_ext.conv_relu_maxpool2d(x, wt, b, [0, 0], 2)
    gi, gw, gb = torch.ops.fmnist_ext._conv_relu_maxpool2d_backward(
        g, x, wt.detach(), idx, [0, 0], 2, [False, True, True]
    )
    assert gi.numel() == 0 and gw.shape == wt.shape and gb.shape == b.shape
    gw_ref, gb_ref = torch.autograd.grad(stock(x, wt, b, 0, 2), (wt, b), g)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(pool, bias):
    x, wt, b = make_case(2, 2, 9, 8, 3, 3, dtype=torch.float64, bias=bias)
    assert torch.autograd.gradcheck(lambda x, w, b: fused(x, w, b, (1, 0), pool), (x, wt, b), eps=1e-6, atol=1e-6)


@requires_compiled_cpu
def test_multithreaded_weight_gradient_reduction_is_exact():
    # The per-thread partial sums of grad_weight must add up to stock's values
    # whatever the thread count.
    x, wt, b = make_case(37, 3, 12, 12, 4, 5, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert_matches_stock(x, wt, b, 0, 2, torch.float64)
    finally:
        torch.set_num_threads(before)


def test_module_state_dict_and_init_match_conv2d():
    torch.manual_seed(123)
    conv = torch.nn.Conv2d(6, 12, 5)
    torch.manual_seed(123)
    block = fmnist_ext.FusedConvReLUMaxPool2d(6, 12, 5)
    assert block.state_dict().keys() == conv.state_dict().keys()
    for key, value in conv.state_dict().items():
        assert torch.equal(block.state_dict()[key], value), key
    other = fmnist_ext.FusedConvReLUMaxPool2d(6, 12, 5)
    other.load_state_dict(conv.state_dict())
    x = torch.randn(3, 6, 12, 12)
    torch.testing.assert_close(other(x), F.max_pool2d(F.relu(conv(x)), 2), rtol=1e-4, atol=1e-5)
    no_bias = fmnist_ext.FusedConvReLUMaxPool2d(1, 6, (5, 3), padding=(1, 2), bias=False, pool=3)
    assert no_bias.bias is None and no_bias.weight.shape == (6, 1, 5, 3)
    assert "pool=3" in repr(no_bias)


def test_conv_output_size_formula():
    from fmnist_ext.model import conv_output_size, feature_size

    # O = floor((n - f + 2p) / s) + 1
    assert conv_output_size(28, 5) == 24
    assert conv_output_size(24, 2, 0, 2) == 12
    assert conv_output_size(7, 3, 1, 2) == 4

    assert feature_size() == 192
