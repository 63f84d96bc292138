"""Every bad input gets a Python exception naming the argument, never a crash."""

import pytest
import torch
from conftest import requires_compiled_cpu

import fmnist_ext


def ok():
    return torch.randn(2, 1, 28, 28), torch.randn(6, 1, 5, 5), torch.randn(6)


CASES = [
    # (id, make args, exception, message fragment)
    ("input-not-4d", lambda x, w, b: (x[0], w, b, 0, 2), ValueError, "input to be a 4-D"),
    ("weight-not-4d", lambda x, w, b: (x, w[0], b, 0, 2), ValueError, "weight to be a 4-D"),
    ("integer-input", lambda x, w, b: (x.long(), w, b, 0, 2), TypeError, "input to be float32 or float64"),
    (
        "complex-input",
        lambda x, w, b: (x.cfloat(), w.cfloat(), b.cfloat(), 0, 2),
        TypeError,
        "input to be float32 or float64, got torch.complex64",
    ),
    (
        "bfloat16-input",
        lambda x, w, b: (x.bfloat16(), w.bfloat16(), b.bfloat16(), 0, 2),
        TypeError,
        "input to be float32 or float64, got torch.bfloat16",
    ),
    ("integer-weight", lambda x, w, b: (x, w.int(), b, 0, 2), TypeError, "weight to have the dtype of input"),
    ("mixed-dtypes", lambda x, w, b: (x, w.double(), b, 0, 2), TypeError, "weight to have the dtype of input"),
    ("mixed-bias-dtype", lambda x, w, b: (x, w, b.double(), 0, 2), TypeError, "bias to have the dtype"),
    ("channel-mismatch", lambda x, w, b: (x, torch.randn(6, 2, 5, 5), b, 0, 2), ValueError, "in-channels"),
    (
        "bias-wrong-length",
        lambda x, w, b: (x, w, torch.randn(5), 0, 2),
        ValueError,
        "bias to be a 1-D tensor of length C_out = 6",
    ),
    ("bias-not-1d", lambda x, w, b: (x, w, torch.randn(6, 1), 0, 2), ValueError, "bias to be a 1-D"),
    (
        "kernel-larger-than-padded-input",
        lambda x, w, b: (x, torch.randn(6, 1, 31, 5), b, 1, 2),
        ValueError,
        "larger than the padded input",
    ),
    ("pool-larger-than-conv-output", lambda x, w, b: (x, w, b, 0, 25), ValueError, "pool window 25 is larger"),
    ("negative-padding", lambda x, w, b: (x, w, b, -1, 2), ValueError, "padding must be non-negative"),
    ("negative-padding-pair", lambda x, w, b: (x, w, b, (0, -2), 2), ValueError, "padding must be non-negative"),
    ("pool-zero", lambda x, w, b: (x, w, b, 0, 0), ValueError, "pool >= 1"),
    ("pool-negative", lambda x, w, b: (x, w, b, 0, -3), ValueError, "pool >= 1"),
    ("pool-float", lambda x, w, b: (x, w, b, 0, 2.0), TypeError, "pool to be an int"),
    ("padding-wrong-type", lambda x, w, b: (x, w, b, "1", 2), TypeError, "padding must be an int or a pair"),
    ("padding-triple", lambda x, w, b: (x, w, b, (1, 1, 1), 2), TypeError, "padding must be an int or a pair"),
    ("input-not-tensor", lambda x, w, b: (x.numpy(), w, b, 0, 2), TypeError, "input to be a Tensor"),
    ("different-devices", lambda x, w, b: (x, w.to("meta"), b, 0, 2), ValueError, "same device"),
    ("bias-different-device", lambda x, w, b: (x, w, b.to("meta"), 0, 2), ValueError, "bias on the device of input"),
]


@pytest.mark.parametrize("make,exc,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_public_api_rejects(make, exc, fragment):
    with pytest.raises(exc, match=fragment):
        fmnist_ext.conv_relu_maxpool2d(*make(*ok()))


def test_module_rejects_bad_construction():
    with pytest.raises(ValueError, match="pool"):
        fmnist_ext.FusedConvReLUMaxPool2d(1, 6, 5, pool=0)
    with pytest.raises(ValueError, match="kernel"):
        fmnist_ext.FusedConvReLUMaxPool2d(1, 6, 0)
    with pytest.raises(ValueError, match="padding"):
        fmnist_ext.FusedConvReLUMaxPool2d(1, 6, 5, padding=-1)


# The C++ checks guard direct callers of torch.ops (no segfault, clear message).
DIRECT = [
    ("input-not-4d", lambda x, w, b: (x[0], w, b, [0, 0], 2), "input to be a 4-D"),
    ("weight-not-4d", lambda x, w, b: (x, w[0], b, [0, 0], 2), "weight to be a 4-D"),
    ("integer-input", lambda x, w, b: (x.long(), w.long(), None, [0, 0], 2), "input to be float32 or float64"),
    ("mixed-dtypes", lambda x, w, b: (x, w.double(), b, [0, 0], 2), "weight to have the dtype of input"),
    ("channel-mismatch", lambda x, w, b: (x, torch.randn(6, 2, 5, 5), b, [0, 0], 2), "in-channels"),
    ("bias-wrong-length", lambda x, w, b: (x, w, torch.randn(5), [0, 0], 2), "bias to be a 1-D"),
    ("kernel-too-large", lambda x, w, b: (x, torch.randn(6, 1, 31, 5), b, [1, 1], 2), "larger than the padded input"),
    ("pool-too-large", lambda x, w, b: (x, w, b, [0, 0], 25), "larger than the convolution output"),
    ("negative-padding", lambda x, w, b: (x, w, b, [-1, 0], 2), "non-negative"),
    ("pool-zero", lambda x, w, b: (x, w, b, [0, 0], 0), "pool >= 1"),
]


@requires_compiled_cpu
@pytest.mark.parametrize("make,fragment", [c[1:] for c in DIRECT], ids=[c[0] for c in DIRECT])
def test_cpp_checks_reject(make, fragment):
    with pytest.raises((ValueError, TypeError), match=fragment):
        torch.ops.fmnist_ext.conv_relu_maxpool2d(*make(*ok()))


@requires_compiled_cpu
def test_cpp_backward_checks_reject():
    x, w, b = ok()
    out, idx = torch.ops.fmnist_ext.conv_relu_maxpool2d(x, w, b, [0, 0], 2)
    bwd = torch.ops.fmnist_ext._conv_relu_maxpool2d_backward
    with pytest.raises(ValueError, match="grad_output of shape"):
        bwd(out[:, :3], x, w, idx, [0, 0], 2, [True, True, True])
    with pytest.raises(TypeError, match="indices of dtype"):
        bwd(out, x, w, idx.int(), [0, 0], 2, [True, True, True])
    with pytest.raises(ValueError, match="indices of shape"):
        bwd(out, x, w, idx[:1], [0, 0], 2, [True, True, True])
    with pytest.raises(TypeError, match="grad_output to have the dtype"):
        bwd(out.double(), x, w, idx, [0, 0], 2, [True, True, True])


@requires_compiled_cpu
def test_bad_cpu_isa_request_is_clear(monkeypatch):
    x, w, b = ok()
    monkeypatch.setenv("FMNIST_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="FMNIST_CPU_ISA must be one of"):
        torch.ops.fmnist_ext.conv_relu_maxpool2d(x, w, b, [0, 0], 2)
