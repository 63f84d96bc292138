"""The backward of a first layer (one input channel, no grad_input asked for:
the model's block 1), on every CPU kernel build.

The CPU kernels compute grad_weight and grad_bias of such a block straight
from the saved indices (backward_kernels.h, weight_grad_cells) when a filter row
fits one vector and kh <= 8; otherwise, and whenever grad_input is asked for,
they go through a list of the winners. The main grid (test_conv_relu_maxpool2d.py) asks for
grad_input, so these cases are here: against stock, and against the winner
list's result (same sums in the same order: equal) with NaN/inf inputs,
NaN gradients of windows without a winner, and out-of-window indices."""

import pytest
import torch
from op_helpers import BWD, OP, assert_matches_stock, cpu_isas_and_cuda, make_case, pair

# (n, h, w, cout, kernel, padding, pool): kernels 1..8 rows take the direct
# path in float32 (kw <= 8) and, for kw <= 4, in float64; kh 9 and kw > 8 do
# not. Odd sizes leave image rows and columns that no pooled output reaches.
CASES = [
    pytest.param(3, 28, 28, 6, 5, 0, 2, id="seed-block1"),
    pytest.param(2, 13, 11, 3, 3, 0, 2, id="odd-3x3"),
    pytest.param(2, 9, 9, 2, 1, 0, 2, id="1x1"),
    pytest.param(2, 12, 10, 3, (2, 4), (1, 2), 3, id="rect-pad-pool3"),
    pytest.param(2, 14, 12, 2, (8, 3), 1, 2, id="kh8"),
    pytest.param(2, 15, 13, 2, (9, 3), 0, 2, id="kh9-list"),
    pytest.param(2, 13, 16, 2, (3, 9), 0, 2, id="kw9-list"),
    pytest.param(2, 8, 9, 3, (2, 3), 0, 1, id="pool1"),
    pytest.param(1, 37, 36, 2, 3, 0, 17, id="pool17-int32-indices"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,h,w,cout,k,padding,pool", CASES)
@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_first_layer_matches_stock(device, n, h, w, cout, k, padding, pool, bias, dtype):
    x, wt, b = make_case(n, 1, h, w, cout, k, dtype=dtype, bias=bias, requires_grad=False, device=device)
    wt.requires_grad_()
    if b is not None:
        b.requires_grad_()
    assert_matches_stock(x, wt, b, padding, pool, dtype)


def _paths(x, wt, indices, g, padding, pool):
    """grad_weight, grad_bias without grad_input (direct path) and with it (winner list)."""
    pads = list(pair(padding))
    _, gw, gb = BWD(g, x, wt, indices, pads, pool, [False, True, True])
    _, gw_list, gb_list = BWD(g, x, wt, indices, pads, pool, [True, True, True])
    return (gw, gb), (gw_list, gb_list)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_first_layer_nan_inf_and_bad_indices_equal_winner_list(device, dtype):
    # 19 x 16 image, 5x4 kernel (one vector per filter row in float64 too),
    # pool 2: conv rows 0..13 (of 15) and columns 0..11 (of 13) reach the
    # pool, so image row 18 and column 15 are read by no pooled output (the
    # kernel copies such rows into its buffer, then zeroes them).
    x, wt, b = make_case(3, 1, 19, 16, 4, (5, 4), dtype=dtype, requires_grad=False, device=device)
    x[2, 0, 18, :] = float("inf")
    x[2, 0, :, 15] = float("-inf")
    pad = (0, 0)
    out, idx = OP(x, wt, b, list(pad), 2)
    g = torch.randn_like(out)
    # NaN and inf gradients where no gradient passes: never read.
    no_grad = idx == 4
    assert no_grad.any()
    g[no_grad] = float("nan")
    g[no_grad & (torch.arange(g.numel(), device=device).view_as(g) % 2 == 0)] = float("inf")
    direct, listed = _paths(x, wt, idx, g, pad, 2)
    for a, e in zip(direct, listed):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert torch.isfinite(a).all()  # the unreached row and column are never read
    # NaN/inf inputs that winners reach propagate into their sums, like the list's.
    x[0, 0, 3, 4] = float("nan")
    x[1, 0, 8, 2] = float("inf")
    out, idx = OP(x, wt, b, list(pad), 2)
    g = torch.where(idx == 4, float("nan"), torch.randn_like(out))
    direct, listed = _paths(x, wt, idx, g, pad, 2)
    for a, e in zip(direct, listed):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(direct[0]).all()
    # Out-of-window values (a hand-made indices tensor) pass no gradient.
    x_fin = torch.nan_to_num(x, nan=0.5, posinf=2.0, neginf=-2.0)
    bad = idx.clone()
    bad.view(-1)[::3] = 200
    bad.view(-1)[1::7] = 5
    g = torch.where((bad >= 4), float("nan"), g)
    direct, listed = _paths(x_fin, wt, bad, g, pad, 2)
    for a, e in zip(direct, listed):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert torch.isfinite(a).all()
