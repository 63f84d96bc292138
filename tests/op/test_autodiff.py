"""Every autodiff mode through the fused op against the stock sequence.

register_autograd alone gave forward-mode AD a None tangent (forward_ad) or
zeros (torch.func.jacfwd) and double backward exact zeros, silently; these
tests compare every mode with stock in float64 (the winners are the same, so
the results agree to rounding), on every device.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from op_helpers import cpu_and_cuda, cpu_isas_and_cuda, make_case, pair, requires_compiled_cpu, stock

import fmnist_ext

# (n, cin, h, w, cout, kernel, padding, pool, bias)
CASES = [
    pytest.param(2, 1, 12, 12, 3, 5, 0, 2, True, id="seed-like"),  # first: forward AD only (cheap)
    pytest.param(1, 2, 7, 8, 2, 3, (1, 0), 3, True, id="padding-pool3"),
    pytest.param(1, 1, 7, 9, 2, (2, 3), 1, 2, False, id="rect-nobias"),
    pytest.param(1, 1, 34, 34, 2, 3, 0, 16, True, id="pool16-int32"),
]
TOL = dict(rtol=1e-9, atol=1e-10)


def _case(device, n, cin, h, w, cout, k, padding, pool, bias, exact=None):
    # On a GPU the data are exact (make_case): stock there sums in another
    # order, and on random reals a near-tied window could pick another winner.
    x, wt, b = make_case(
        n, cin, h, w, cout, k, dtype=torch.float64, bias=bias, requires_grad=False, device=device, exact=exact
    )
    args = (x, wt) if b is None else (x, wt, b)

    def make(fn):
        def f(x, wt, b=None):
            return fn(x, wt, b, pair(padding), pool)

        return f

    return args, make(lambda *a: fmnist_ext.conv_relu_maxpool2d(*a)), make(stock)


@pytest.mark.parametrize("n,cin,h,w,cout,k,padding,pool,bias", CASES)
@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_forward_ad_dual_tensors_match_stock(device, n, cin, h, w, cout, k, padding, pool, bias):
    args, fused, ref = _case(device, n, cin, h, w, cout, k, padding, pool, bias)
    tangents = [torch.randn_like(a) for a in args]
    results = []
    for fn in (fused, ref):
        with fwAD.dual_level():
            out = fn(*(fwAD.make_dual(a, t) for a, t in zip(args, tangents)))
            results.append(fwAD.unpack_dual(out).tangent)
    assert results[0] is not None, "the fused op dropped the tangent"
    assert results[0].abs().sum() > 0
    torch.testing.assert_close(results[0], results[1], **TOL)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_forward_ad_tangent_on_one_argument_only(device):
    # Only the weight carries a tangent, nothing requires grad: the case that
    # used to return None.
    args, fused, ref = _case(device, 2, 2, 10, 10, 3, 3, 0, 2, True)
    x, wt, b = args
    tw = torch.randn_like(wt)
    got, want = [], []
    for fn, sink in ((fused, got), (ref, want)):
        with fwAD.dual_level():
            sink.append(fwAD.unpack_dual(fn(x, fwAD.make_dual(wt, tw), b)).tangent)
    torch.testing.assert_close(got[0], want[0], **TOL)


@pytest.mark.parametrize("n,cin,h,w,cout,k,padding,pool,bias", CASES[1:3])
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_jacfwd_and_jacrev_match_stock(device, n, cin, h, w, cout, k, padding, pool, bias):
    args, fused, ref = _case(device, n, cin, h, w, cout, k, padding, pool, bias)
    argnums = tuple(range(len(args)))
    want = torch.func.jacfwd(ref, argnums=argnums)(*args)
    for jac in (torch.func.jacfwd, torch.func.jacrev):
        got = jac(fused, argnums=argnums)(*args)
        for a, e in zip(got, want):
            assert a.abs().sum() > 0
            torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize("n,cin,h,w,cout,k,padding,pool,bias", CASES[1:3])
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_gradgradcheck(device, n, cin, h, w, cout, k, padding, pool, bias):
    # Random reals on every device: finite differences need points away from
    # ties (and nothing is compared with stock here).
    args, fused, _ = _case(device, n, cin, h, w, cout, k, padding, pool, bias, exact=False)
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradgradcheck(fused, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", cpu_isas_and_cuda())
def test_gradient_penalty_matches_stock(device):
    # create_graph=True, then the gradient of a function of the gradients.
    args, fused, ref = _case(device, 3, 2, 12, 12, 4, 3, 1, 2, True)
    results = []
    for fn in (fused, ref):
        leaves = [a.clone().requires_grad_() for a in args]
        grads = torch.autograd.grad(fn(*leaves).square().sum(), leaves, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        results.append(torch.autograd.grad(penalty, leaves))
    for a, e in zip(*results):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_hessian_and_forward_over_reverse_match_stock(device):
    args, fused, ref = _case(device, 1, 1, 8, 8, 2, 3, 0, 2, True)
    x, wt, b = args
    for argnum in (0, 1, 2):
        got = torch.func.hessian(lambda *a: fused(*a).square().sum(), argnums=argnum)(x, wt, b)
        want = torch.func.hessian(lambda *a: ref(*a).square().sum(), argnums=argnum)(x, wt, b)
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_third_order_matches_stock(device):
    args, fused, ref = _case(device, 1, 1, 8, 8, 2, 3, 0, 2, True)
    results = []
    for fn in (fused, ref):
        x = args[0].clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x, *args[1:]).pow(3).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gg.sum(), x))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_func_grad_and_vmap_match_stock(device):
    args, fused, ref = _case(device, 2, 2, 10, 10, 3, 3, 0, 2, True)
    x, wt, b = args
    for argnum in (0, 1, 2):
        got = torch.func.grad(lambda *a: fused(*a).square().sum(), argnums=argnum)(x, wt, b)
        want = torch.func.grad(lambda *a: ref(*a).square().sum(), argnums=argnum)(x, wt, b)
        torch.testing.assert_close(got, want, **TOL)
    xs = torch.randn(3, *x.shape, dtype=x.dtype, device=x.device)
    ws = torch.randn(3, *wt.shape, dtype=wt.dtype, device=wt.device)
    for in_dims, batch in (((0, None, None), (xs, wt, b)), ((None, 0, None), (x, ws, b))):
        torch.testing.assert_close(
            torch.vmap(fused, in_dims=in_dims)(*batch), torch.vmap(ref, in_dims=in_dims)(*batch), **TOL
        )


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_inference_mode_and_no_grad(device):
    args, fused, ref = _case(device, 2, 2, 10, 10, 3, 3, 0, 2, True)
    with torch.inference_mode():
        torch.testing.assert_close(fused(*args), ref(*args), **TOL)
    leaves = [a.clone().requires_grad_() for a in args]
    with torch.no_grad():
        y = fused(*leaves)
    assert not y.requires_grad


@requires_compiled_cpu
def test_meta_tensors_give_shapes():
    x, wt, b = (t.to("meta") for t in make_case(2, 1, 28, 28, 6, 5, requires_grad=False))
    assert fmnist_ext.conv_relu_maxpool2d(x, wt, b).shape == (2, 6, 12, 12)
    out, idx = torch.ops.fmnist_ext.conv_relu_maxpool2d(x, wt, b, [0, 0], 2)
    assert out.shape == (2, 6, 12, 12) and idx.dtype == torch.uint8 and out.device.type == "meta"
