"""grad_weight of a block with several input channels, on every CPU kernel build.

The CPU kernels compute it with the input channels in the vector lanes
(backward_kernels.h, weight_grad_cl) when a filter row of the channels-last input
(kw pixels x cin padded to whole vectors) is 1, 2, 3, 4, 5, 6 or 10 vectors,
and otherwise over planar filter rows. These cases hit every such width in
float32 and float64 (8 and 4 lanes), the fallback, and each output mask that
asks for grad_weight with and without grad_input (the model's block 2 without
grad_input is the first layer of a frozen-feature fine-tune), against stock
and against the same call asking for all three gradients."""

import pytest
import torch
from op_helpers import (
    BWD,
    OP,
    assert_matches_stock,
    cpu_isas_and_cuda,
    forward_and_grads,
    make_case,
    pair,
    stock,
    tolerances,
)

# (n, cin, h, w, cout, k, padding, pool); the comment gives the filter row in
# vectors for float32 / float64.
CASES = [
    pytest.param(3, 6, 12, 12, 12, 5, 0, 2, id="block2"),  # 5 / 10
    pytest.param(2, 3, 11, 10, 4, 1, 0, 2, id="k1"),  # 1 / 1
    pytest.param(2, 3, 9, 10, 3, (3, 2), (1, 0), 2, id="kw2-pad"),  # 2 / 2
    pytest.param(2, 2, 10, 11, 5, 3, 1, 2, id="k3-pad"),  # 3 / 3
    pytest.param(2, 4, 12, 9, 3, (2, 4), 0, 3, id="kw4-pool3"),  # 4 / 4
    pytest.param(2, 9, 10, 10, 3, 3, 0, 2, id="cin9-k3"),  # 6 / 9 (fallback)
    pytest.param(1, 7, 9, 8, 2, 3, 0, 1, id="cin7-k3-pool1"),  # 3 / 6
    pytest.param(2, 5, 13, 12, 3, 5, 1, 2, id="cin5-k5"),  # 5 / 10
    pytest.param(1, 17, 10, 10, 2, 3, 0, 2, id="cin17-fallback"),  # 9 / 15 (fallback)
    pytest.param(1, 2, 40, 40, 2, 3, 0, 16, id="pool16-int32-indices"),  # 3 / 3
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,cin,h,w,cout,k,padding,pool", CASES)
@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_matches_stock(device, n, cin, h, w, cout, k, padding, pool, dtype):
    x, wt, b = make_case(n, cin, h, w, cout, k, dtype=dtype, device=device)
    assert_matches_stock(x, wt, b, padding, pool, dtype)


@pytest.mark.parametrize("mask", [[False, True, True], [False, True, False], [True, True, False]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,cin,h,w,cout,k,padding,pool", CASES)
@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_masks_match_stock_and_full_call(device, n, cin, h, w, cout, k, padding, pool, dtype, mask):
    x, wt, b = make_case(n, cin, h, w, cout, k, dtype=dtype, device=device)
    _, (gx_ref, gw_ref, gb_ref), g = forward_and_grads(stock, x, wt, b, padding, pool)
    pads = list(pair(padding))
    _, idx = OP(x.detach(), wt.detach(), b.detach(), pads, pool)
    got = BWD(g, x.detach(), wt.detach(), idx, pads, pool, mask)
    full = BWD(g, x.detach(), wt.detach(), idx, pads, pool, [True, True, True])
    tol = tolerances(dtype)
    for asked, a, f, want in zip(mask, got, full, (gx_ref, gw_ref, gb_ref)):
        if asked:
            # The same sums whatever else is asked for.
            torch.testing.assert_close(a, f, rtol=0, atol=0)
            torch.testing.assert_close(a, want, **tol)
        else:
            assert a.numel() == 0
