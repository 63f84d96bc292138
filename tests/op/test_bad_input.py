"""Every bad input gets a Python exception naming the argument, never a crash,
on every device (a tensor on another device: meta beside cpu, cpu beside cuda)."""

import pytest
import torch
from op_helpers import cpu_and_cuda, cuda_only, other_device, requires_compiled_cpu

import fmnist_ext


def ok(device="cpu"):
    return tuple(t.to(device) for t in (torch.randn(2, 1, 28, 28), torch.randn(6, 1, 5, 5), torch.randn(6)))


CASES = [
    # (id, make args, exception, message fragment); new tensors go on x's device
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
    (
        "channel-mismatch",
        lambda x, w, b: (x, torch.randn(6, 2, 5, 5, device=x.device), b, 0, 2),
        ValueError,
        "in-channels",
    ),
    (
        "bias-wrong-length",
        lambda x, w, b: (x, w, torch.randn(5, device=x.device), 0, 2),
        ValueError,
        "bias to be a 1-D tensor of length C_out = 6",
    ),
    ("bias-not-1d", lambda x, w, b: (x, w, torch.randn(6, 1, device=x.device), 0, 2), ValueError, "bias to be a 1-D"),
    (
        "kernel-larger-than-padded-input",
        lambda x, w, b: (x, torch.randn(6, 1, 31, 5, device=x.device), b, 1, 2),
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
    ("input-not-tensor", lambda x, w, b: (x.cpu().numpy(), w, b, 0, 2), TypeError, "input to be a Tensor"),
    ("different-devices", lambda x, w, b: (x, _elsewhere(w), b, 0, 2), ValueError, "same device"),
    ("input-different-device", lambda x, w, b: (_elsewhere(x), w, b, 0, 2), ValueError, "same device"),
    ("bias-different-device", lambda x, w, b: (x, w, _elsewhere(b), 0, 2), ValueError, "bias on the device of input"),
]


def _elsewhere(t):
    return t.to(other_device(t.device.type))


@pytest.mark.parametrize("make,exc,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("device", cpu_and_cuda(compiled=False))
def test_public_api_rejects(device, make, exc, fragment):
    with pytest.raises(exc, match=fragment):
        fmnist_ext.conv_relu_maxpool2d(*make(*ok(device)))


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
    ("channel-mismatch", lambda x, w, b: (x, torch.randn(6, 2, 5, 5, device=x.device), b, [0, 0], 2), "in-channels"),
    ("bias-wrong-length", lambda x, w, b: (x, w, torch.randn(5, device=x.device), [0, 0], 2), "bias to be a 1-D"),
    (
        "kernel-too-large",
        lambda x, w, b: (x, torch.randn(6, 1, 31, 5, device=x.device), b, [1, 1], 2),
        "larger than the padded input",
    ),
    ("pool-too-large", lambda x, w, b: (x, w, b, [0, 0], 25), "larger than the convolution output"),
    ("negative-padding", lambda x, w, b: (x, w, b, [-1, 0], 2), "non-negative"),
    ("pool-zero", lambda x, w, b: (x, w, b, [0, 0], 0), "pool >= 1"),
    ("half-input", lambda x, w, b: (x.half(), w.half(), b.half(), [0, 0], 2), "float32 or float64"),
    ("weight-other-device", lambda x, w, b: (x, _elsewhere(w), b, [0, 0], 2), "same device"),
    ("input-other-device", lambda x, w, b: (_elsewhere(x), w, b, [0, 0], 2), "same device"),
    ("bias-other-device", lambda x, w, b: (x, w, _elsewhere(b), [0, 0], 2), "bias"),
]


@pytest.mark.parametrize("make,fragment", [c[1:] for c in DIRECT], ids=[c[0] for c in DIRECT])
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_cpp_checks_reject(device, make, fragment):
    with pytest.raises((ValueError, TypeError), match=fragment):
        torch.ops.fmnist_ext.conv_relu_maxpool2d(*make(*ok(device)))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("device", cuda_only())
def test_cpp_checks_reject_two_gpus(device):
    x, w, b = ok(device)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.fmnist_ext.conv_relu_maxpool2d(x, w.to("cuda:1"), b, [0, 0], 2)


# (id, make the backward's args from (out, x, w, idx), exception, message fragment)
BACKWARD = [
    ("grad-output-shape", lambda g, x, w, i: (g[:, :3], x, w, i), ValueError, "grad_output of shape"),
    ("grad-output-batch", lambda g, x, w, i: (g[:1], x, w, i), ValueError, "grad_output"),
    ("indices-dtype", lambda g, x, w, i: (g, x, w, i.int()), TypeError, "indices of dtype"),
    ("indices-shape", lambda g, x, w, i: (g, x, w, i[:1]), ValueError, "indices of shape"),
    ("grad-output-dtype", lambda g, x, w, i: (g.double(), x, w, i), TypeError, "grad_output to have the dtype"),
]
# On cpu the other device is meta: the dispatcher then runs the backward's
# fake kernel, which must refuse the mix like the C++ checks do (it used to
# check only input and weight and return uninitialised cpu tensors).
BACKWARD_OTHER_DEVICE = [
    ("indices-other-device", lambda g, x, w, i: (g, x, w, _elsewhere(i)), ValueError, "device"),
    ("grad-output-other-device", lambda g, x, w, i: (_elsewhere(g), x, w, i), ValueError, "device"),
]


def _on(devices, cases):
    """(device, make, exc, fragment) parameters: every case on every device case."""
    return [pytest.param(d.values[0], *c[1:], marks=d.marks, id=f"{d.id}-{c[0]}") for d in devices for c in cases]


@pytest.mark.parametrize("device,make,exc,fragment", _on(cpu_and_cuda(), BACKWARD + BACKWARD_OTHER_DEVICE))
def test_cpp_backward_checks_reject(device, make, exc, fragment):
    x, w, b = ok(device)
    out, idx = torch.ops.fmnist_ext.conv_relu_maxpool2d(x, w, b, [0, 0], 2)
    bwd = torch.ops.fmnist_ext._conv_relu_maxpool2d_backward
    with pytest.raises(exc, match=fragment):
        bwd(*make(torch.ones_like(out), x, w, idx), [0, 0], 2, [True, True, True])


@requires_compiled_cpu
def test_bad_cpu_isa_request_is_clear(monkeypatch):
    x, w, b = ok()
    monkeypatch.setenv("FMNIST_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="FMNIST_CPU_ISA must be one of"):
        torch.ops.fmnist_ext.conv_relu_maxpool2d(x, w, b, [0, 0], 2)
