"""Mixed precision: the fused op and the FashionCNN under torch.autocast
(cpu bfloat16; cuda float16 and bfloat16).

Under autocast the op computes in float32 and returns the autocast dtype, like
the stock nn.Conv2d it replaces; outside autocast a half-precision input is a
TypeError naming the dtype. Stock computes its convolution in the autocast
dtype, the fused op in float32, so they agree to that precision (bfloat16: 8 bits of mantissa),
measured as norms relative to the reference's: an elementwise bound would be
flaky, since a window whose two largest values round to a tie in bfloat16
sends its whole gradient to another pixel. The fused op's own results equal
float32's rounded once; the whole model is compared with the stock model
whose conv blocks run in float32 too, so only roundings differ.
"""

import pytest
import torch
import torch.nn.functional as F
from op_helpers import cpu_and_cuda, cpu_isas_and_cuda, make_case, stock

import fmnist_ext
from fmnist_ext.model import FashionCNN, StockConvReLUMaxPool2d

# The autocast dtypes of each device (torch.autocast's own: cpu bfloat16; cuda float16, bfloat16).
AUTOCAST_DTYPES = {"cpu": [torch.bfloat16], "cuda": [torch.float16, torch.bfloat16]}


def autocast_cases(devices):
    """(device, dtype) parameters: every autocast dtype of every device case."""
    return [
        pytest.param(p.values[0], dtype, marks=p.marks, id=f"{p.id}-{str(dtype).removeprefix('torch.')}")
        for p in devices
        for dtype in AUTOCAST_DTYPES[p.values[0]]
    ]


def rel_err(got, want):
    got, want = got.detach().float(), want.detach().float()
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


def assert_close_low_precision(got, want, tol=2e-2):
    assert got.dtype == want.dtype
    assert rel_err(got, want) < tol, f"relative error {rel_err(got, want):.3g}"


# One bfloat16 unit roundoff (8 bits of mantissa).
U_BF16 = 2.0**-8


def with_float32_blocks(model: FashionCNN, device: str, dtype: torch.dtype) -> FashionCNN:
    """The stock model as the fused one computes under autocast: its conv
    blocks in float32, their outputs rounded once to the autocast dtype."""
    for block in (model.conv1, model.conv2):

        def forward(x, block=block):
            with torch.autocast(device, enabled=False):
                return StockConvReLUMaxPool2d.forward(block, x.float()).to(dtype)

        block.forward = forward
    return model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("device,dtype", autocast_cases(cpu_isas_and_cuda()))
def test_op_under_autocast_matches_stock(device, dtype, bias):
    # Exact data on a GPU (make_case): the elementwise comparison with stock's
    # float32 gradients below would otherwise see near-ties broken differently.
    x, w, b = make_case(8, 6, 12, 12, 12, 5, bias=bias, device=device)
    leaves = [t for t in (x, w, b) if t is not None]
    results = []
    for fn in (fmnist_ext.conv_relu_maxpool2d, lambda x, w, b: stock(x, w, b, 0, 2)):
        with torch.autocast(device, dtype=dtype):
            y = fn(x, w, b)
        g = torch.ones_like(y)  # a fixed upstream gradient (in the output dtype)
        results.append((y, torch.autograd.grad(y, leaves, g)))
    (y, grads), (y_ref, _) = results
    assert y.dtype == dtype
    assert_close_low_precision(y, y_ref)
    y32 = stock(x, w, b, 0, 2)
    grads32 = torch.autograd.grad(y32, leaves, torch.ones_like(y32))
    for got in grads:
        assert got.dtype == torch.float32  # gradients in the parameters' dtype
    # The fused op computes in float32: exactly stock's float32 result, rounded.
    torch.testing.assert_close(y, y32.to(dtype))
    for got, want in zip(grads, grads32):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,dtype", autocast_cases(cpu_and_cuda()))
def test_half_inputs_under_autocast_and_direct_op_call(device, dtype):
    x, w, b = make_case(2, 1, 28, 28, 6, 5, requires_grad=False, device=device)
    with torch.autocast(device, dtype=dtype):
        y = fmnist_ext.conv_relu_maxpool2d(x.to(dtype), w.to(dtype), b.to(dtype))
        out, idx = torch.ops.fmnist_ext.conv_relu_maxpool2d(x.to(dtype), w, b, [0, 0], 2)
    ref = F.max_pool2d(F.relu(F.conv2d(x.to(dtype).float(), w.to(dtype).float(), b.to(dtype).float())), 2)
    assert y.dtype == out.dtype == dtype and idx.dtype == torch.uint8
    torch.testing.assert_close(y, ref.to(dtype))


@pytest.mark.parametrize("device,dtype", autocast_cases(cpu_and_cuda()))
def test_float64_is_left_alone_under_autocast(device, dtype):
    x, w, b = make_case(2, 1, 28, 28, 6, 5, dtype=torch.float64, requires_grad=False, device=device)
    with torch.autocast(device, dtype=dtype):
        y = fmnist_ext.conv_relu_maxpool2d(x, w, b)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, stock(x, w, b, 0, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", cpu_and_cuda(compiled=False))
def test_half_input_outside_autocast_is_a_clear_type_error(device, dtype):
    x, w, b = make_case(2, 1, 28, 28, 6, 5, dtype=dtype, requires_grad=False, device=device)
    with pytest.raises(TypeError, match=f"input to be float32 or float64, got {dtype}"):
        fmnist_ext.conv_relu_maxpool2d(x, w, b)


@pytest.mark.parametrize("device,dtype", autocast_cases(cpu_and_cuda()))
def test_fashion_cnn_trains_under_autocast_like_stock(device, dtype):
    # The reference is the stock model with its conv blocks in float32, as the
    # fused op runs them: both then do the same low-precision operations, and
    # differ only where float32 summation order flips a rounding to the
    # autocast dtype (one unit in the last place, U_BF16 relative, for a few
    # values in a batch). Forward, a flip stays that size: logits within
    # 4 U_BF16. Backward, training-mode BatchNorm divides by the batch's
    # spread and amplifies it (up to 12 U_BF16 seen over 8 seeds): gradients
    # within 32 U_BF16, still far below a wrong gradient's error (order 1).
    torch.manual_seed(0)
    fused = FashionCNN("fused").to(device)
    plain = FashionCNN("stock").to(device)
    plain.load_state_dict(fused.state_dict())
    with_float32_blocks(plain, device, dtype)
    x = torch.randn(64, 1, 28, 28).to(device)
    labels = torch.randint(0, 10, (64,)).to(device)
    results = []
    for model in (fused, plain):
        model.train()
        with torch.autocast(device, dtype=dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, labels)
        results.append((logits, torch.autograd.grad(loss, list(model.parameters()))))
    (logits, grads), (logits_ref, grads_ref) = results
    assert logits.dtype == logits_ref.dtype == dtype
    assert_close_low_precision(logits, logits_ref, tol=4 * U_BF16)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == torch.float32
        assert rel_err(got, want) <= 32 * U_BF16, rel_err(got, want)
