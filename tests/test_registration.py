"""Custom-operator conventions: opcheck, torch.compile without graph breaks."""

import pytest
import torch
from conftest import requires_compiled_cpu
from op_helpers import make_case, stock

import fmnist_ext

OP = torch.ops.fmnist_ext.conv_relu_maxpool2d.default if hasattr(torch.ops.fmnist_ext, "conv_relu_maxpool2d") else None


def _samples():
    yield make_case(2, 1, 28, 28, 6, 5), [0, 0], 2
    yield make_case(3, 6, 12, 12, 12, 5), [0, 0], 2
    yield make_case(2, 2, 9, 8, 3, (3, 2), bias=False), [1, 2], 3
    yield make_case(1, 2, 8, 8, 3, 3, dtype=torch.float64), [1, 1], 2
    x, w, b = make_case(2, 1, 28, 28, 6, 5)
    yield (x.detach(), w, b), [0, 0], 2  # first layer: no input gradient
    yield make_case(0, 1, 28, 28, 6, 5), [0, 0], 2


@requires_compiled_cpu
@pytest.mark.parametrize("i", range(6))
def test_opcheck_forward(i):
    (x, w, b), padding, pool = list(_samples())[i]
    torch.library.opcheck(OP, (x, w, b, padding, pool))


@requires_compiled_cpu
def test_opcheck_backward():
    x, w, b = make_case(2, 3, 10, 10, 4, 3, requires_grad=False)
    out, idx = OP(x, w, b, [1, 1], 2)
    g = torch.randn_like(out)
    for mask in ([True, True, True], [False, True, True], [True, False, False]):
        torch.library.opcheck(
            torch.ops.fmnist_ext._conv_relu_maxpool2d_backward.default, (g, x, w, idx, [1, 1], 2, mask)
        )


@requires_compiled_cpu
def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    block1 = fmnist_ext.FusedConvReLUMaxPool2d(1, 6, 5)
    block2 = fmnist_ext.FusedConvReLUMaxPool2d(6, 12, 5)

    def f(x):
        return block2(block1(x)).square().sum()

    compiled = torch.compile(f, fullgraph=True)  # raises on any graph break
    x = torch.randn(8, 1, 28, 28)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(block1.parameters()) + list(block2.parameters()))
    loss_ref = f(x)
    grads_ref = torch.autograd.grad(loss_ref, list(block1.parameters()) + list(block2.parameters()))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@requires_compiled_cpu
def test_fake_kernel_shapes_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b = make_case(3, 2, 11, 13, 4, (3, 5), requires_grad=False)
    real_out, real_idx = OP(x, w, b, [1, 0], 3)
    with FakeTensorMode() as mode:
        fx, fw, fb = (mode.from_tensor(t) for t in (x, w, b))
        fake_out, fake_idx = OP(fx, fw, fb, [1, 0], 3)
    assert fake_out.shape == real_out.shape and fake_idx.dtype == real_idx.dtype
    assert fake_out.stride() == real_out.stride()


def test_compiled_model_matches_stock_reference():
    # Public API through the whole stack (compiled kernels or fallback alike).
    x, w, b = make_case(2, 1, 28, 28, 6, 5, requires_grad=False)
    torch.testing.assert_close(fmnist_ext.conv_relu_maxpool2d(x, w, b), stock(x, w, b, 0, 2), rtol=1e-4, atol=1e-5)
