"""Custom-operator conventions on every device: opcheck, fake kernels,
torch.compile without graph breaks."""

import os

import pytest
import torch
from op_helpers import cpu_and_cuda, make_case, stock

import fmnist_ext
from fmnist_ext.op import _library

OP = torch.ops.fmnist_ext.conv_relu_maxpool2d.default if hasattr(torch.ops.fmnist_ext, "conv_relu_maxpool2d") else None
BWD = (
    torch.ops.fmnist_ext._conv_relu_maxpool2d_backward.default
    if hasattr(torch.ops.fmnist_ext, "_conv_relu_maxpool2d_backward")
    else None
)


def _detached(case):
    return tuple(t.detach() if t is not None else None for t in case)


def _samples(device):
    """(x, w, b), padding, pool: the forward's opcheck cases."""
    yield make_case(2, 1, 28, 28, 6, 5, device=device), [0, 0], 2
    yield make_case(3, 6, 12, 12, 12, 5, device=device), [0, 0], 2
    yield make_case(2, 2, 9, 8, 3, (3, 2), bias=False, device=device), [1, 2], 3
    yield make_case(1, 2, 8, 8, 3, 3, dtype=torch.float64, device=device), [1, 1], 2
    x, w, b = make_case(2, 1, 28, 28, 6, 5, device=device)
    yield (x.detach(), w, b), [0, 0], 2  # first layer: no input gradient
    yield make_case(0, 1, 28, 28, 6, 5, device=device), [0, 0], 2
    yield make_case(2, 3, 11, 10, 4, 3, device=device), [1, 1], 3
    yield _detached(make_case(2, 3, 11, 10, 4, 3, bias=False, device=device)), [0, 1], 3
    yield make_case(2, 2, 20, 19, 4, 3, device=device), [1, 1], 16  # int32 indices
    yield _detached(make_case(2, 2, 20, 19, 4, 3, bias=False, device=device)), [0, 1], 16


N_SAMPLES = sum(1 for _ in _samples("cpu"))


@pytest.mark.parametrize("i", range(N_SAMPLES))
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck_forward(device, i):
    (x, w, b), padding, pool = list(_samples(device))[i]
    torch.library.opcheck(OP, (x, w, b, padding, pool))


# (input shape as make_case's first four, cout, padding, pool, output masks)
BACKWARD_CASES = [
    pytest.param((2, 3, 10, 10), 4, 2, [[1, 1, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0]], id="pool2"),
    pytest.param((2, 3, 11, 10), 4, 3, [[1, 1, 1], [0, 1, 0]], id="pool3"),
    pytest.param((2, 2, 20, 19), 4, 16, [[1, 1, 1], [0, 1, 0]], id="pool16-int32"),
]


@pytest.mark.parametrize("xs,cout,pool,masks", BACKWARD_CASES)
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck_backward(device, xs, cout, pool, masks):
    x, w, b = make_case(*xs, cout, 3, requires_grad=False, device=device)
    out, idx = OP(x, w, b, [1, 1], pool)
    g = torch.randn_like(out)
    for mask in masks:
        torch.library.opcheck(BWD, (g, x, w, idx, [1, 1], pool, [bool(m) for m in mask]))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile_fullgraph_forward_backward(device):
    torch._dynamo.reset()
    block1 = fmnist_ext.FusedConvReLUMaxPool2d(1, 6, 5).to(device)
    block2 = fmnist_ext.FusedConvReLUMaxPool2d(6, 12, 5).to(device)
    params = list(block1.parameters()) + list(block2.parameters())

    def f(x):
        return block2(block1(x))

    compiled = torch.compile(f, fullgraph=True)  # raises on any graph break
    x = torch.randn(8, 1, 28, 28, device=device)
    out = compiled(x)
    ref = f(x)
    torch.testing.assert_close(out, ref)
    loss, loss_ref = out.square().sum(), ref.square().sum()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(loss, params)
    grads_ref = torch.autograd.grad(loss_ref, params)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_fake_kernel_shapes_match_real(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b = make_case(3, 2, 11, 13, 4, (3, 5), requires_grad=False, device=device)
    real_out, real_idx = OP(x, w, b, [1, 0], 3)
    with FakeTensorMode() as mode:
        fx, fw, fb = (mode.from_tensor(t) for t in (x, w, b))
        fake_out, fake_idx = OP(fx, fw, fb, [1, 0], 3)
    assert fake_out.shape == real_out.shape and fake_idx.dtype == real_idx.dtype
    assert fake_out.stride() == real_out.stride()
    assert fake_out.device == real_out.device


@pytest.mark.parametrize("device", cpu_and_cuda(compiled=False))
def test_public_function_matches_stock_with_or_without_the_kernels(device):
    # The public API through the whole stack: the compiled kernels, or (cpu
    # only) the reference fallback when they cannot be loaded.
    x, w, b = make_case(2, 1, 28, 28, 6, 5, requires_grad=False, device=device)
    torch.testing.assert_close(fmnist_ext.conv_relu_maxpool2d(x, w, b), stock(x, w, b, 0, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    os.environ.get("FMNIST_REQUIRE_CUDA_BUILD", "") in ("", "0"),
    reason="only where the build must include the CUDA kernels (CI's newest-torch stage sets FMNIST_REQUIRE_CUDA_BUILD=1)",
)
def test_the_cuda_build_registered_both_ops():
    # CI compiles the CUDA kernels without a GPU to run them: at least they
    # must build and register for the CUDA dispatch key.
    assert _library.LOADED, _library.NOT_LOADED_REASON
    assert _library.build_info().WITH_CUDA, "the build did not compile the CUDA kernels"
    for op in (_library.FORWARD_OP, _library.BACKWARD_OP):
        assert _library.has_kernel(op, "CUDA"), f"{op}: no CUDA kernel"


def _registered_ops() -> list[str]:
    """Every operator the C++ sources define (m.def("name(...) -> ...")), with the schema."""
    import re
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[2] / "csrc"
    text = "\n".join(p.read_text() for p in sorted(csrc.rglob("*.cpp")))
    text = re.sub(r'"\s*\n\s*"', "", text)  # C++ adjacent string literals, joined
    return re.findall(r'm\.def\(\s*"(\w+)\((.*?)\)\s*->', text, re.S)


def test_every_registered_operator_with_tensors_has_a_fake_kernel():
    # fashion_cnn_inference had none. A fake kernel is what torch.compile,
    # torch.export and FakeTensor tracing need; opcheck (elsewhere) tests each one's results.
    import fmnist_ext.inference  # registers the whole-model op's fake kernel

    ops = _registered_ops()
    assert {"conv_relu_maxpool2d", "channel_moments", "fashion_cnn_inference"} <= {n for n, _ in ops}
    if not fmnist_ext.kernels_status()["compiled_library_loaded"]:
        pytest.skip("compiled library not loaded")
    missing = []
    for name, args in ops:
        if "Tensor" not in args:
            continue  # _cpu_isa() and friends: nothing to trace
        if not _library.has_kernel(f"fmnist_ext::{name}", "Meta"):
            missing.append(name)
    assert not missing, f"no fake (Meta) kernel: {missing}"
