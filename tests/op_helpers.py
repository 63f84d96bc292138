"""Helpers shared by the operator tests (imported by name: `from op_helpers import ...`)."""

import torch

import fmnist_ext
from fmnist_ext.op import reference


def make_case(n, cin, h, w, cout, k, dtype=torch.float32, bias=True, requires_grad=True, device="cpu"):
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w, dtype=dtype, device=device)
    wt = torch.randn(cout, cin, kh, kw, dtype=dtype, device=device) / (cin * kh * kw) ** 0.5
    b = torch.randn(cout, dtype=dtype, device=device) * 0.1 if bias else None
    if requires_grad:
        x.requires_grad_()
        wt.requires_grad_()
        if b is not None:
            b.requires_grad_()
    return x, wt, b


def pair(p):
    return (p, p) if isinstance(p, int) else tuple(p)


def forward_and_grads(fn, x, w, b, padding, pool, grad_out=None):
    """Output and (grad_input, grad_weight, grad_bias) of fn for a given grad_out."""
    y = fn(x, w, b, padding, pool)
    if grad_out is None:
        grad_out = torch.randn_like(y)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grads = (
        torch.autograd.grad(y, inputs, grad_out, allow_unused=True)
        if inputs and y.numel()
        else [torch.zeros_like(t) for t in inputs]
    )
    return y, grads, grad_out


def fused(x, w, b, padding, pool):
    return fmnist_ext.conv_relu_maxpool2d(x, w, b, padding, pool)


def stock(x, w, b, padding, pool):
    return reference.conv_relu_maxpool2d(x, w, b, pair(padding), pool)


def tolerances(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def assert_matches_stock(x, w, b, padding, pool, dtype):
    y, grads, g = forward_and_grads(fused, x, w, b, padding, pool)
    y_ref, grads_ref, _ = forward_and_grads(stock, x, w, b, padding, pool, g)
    tol = tolerances(dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **tol)
    return y
