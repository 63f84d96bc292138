"""FashionCNN.for_inference(): same outputs as the eval-mode model, and its errors.

The source models have non-trivial BatchNorm statistics and affine parameters
(a few Adam steps in training mode), so the folding is really exercised.
With the compiled library the CPU forward is the single C++ op
fmnist_ext::fashion_cnn_inference; FMNIST_REQUIRE_COMPILED=1 makes the tests
insist on it. On cuda the folded model runs operator by operator through the
fused CUDA kernels: the tests of what the inference form computes run on every
device, those of the whole-model C++ op on the CPU only.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from op_helpers import cpu_and_cuda, cpu_isas_and_cuda

from fmnist_ext import inference
from fmnist_ext.model import FashionCNN
from fmnist_ext.op import _library

REQUIRE_COMPILED = os.environ.get("FMNIST_REQUIRE_COMPILED", "") not in ("", "0")


def trained_model(kernels: str = "fused", dtype=torch.float32, steps: int = 3, device: str = "cpu") -> FashionCNN:
    """A FashionCNN after a few training steps (on the CPU, so every device
    gets the same model): BN running stats, gamma, beta all moved."""
    torch.manual_seed(0)
    model = FashionCNN(kernels).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        x = torch.randn(32, 1, 28, 28, dtype=dtype) * 1.5 + 0.3
        y = torch.randint(0, 10, (32,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model.to(device)


def eval_logits(model: FashionCNN, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def float32_rounding_bound(model: FashionCNN, x: torch.Tensor) -> torch.Tensor:
    """Worst-case float32 rounding error of the eval logits, per logit.

    Running error analysis along the float64 evaluation: a layer y = W v + b
    computed in any order (FMA or not) errs by at most
    gamma_n * (|W| |v| + |b|), gamma_n = n u / (1 - n u), u = 2**-24, for n
    terms (its fan-in plus 2: the bias, and the inference form's rounding of
    folded weights); an error e already in v adds |W| e; ReLU and max-pool
    never enlarge an error (max-pool of the bounds over each window);
    BatchNorm (v - mean) * a + beta adds |a| e + gamma_8 (|a| (|v| + |mean|) +
    |beta|). It holds for any summation order and ISA, so on any machine."""
    u = 2.0**-24

    def gamma(n):
        return n * u / (1 - n * u)

    def linear(v, e, w, b, op):
        n = w[0].numel() + 2
        return op(v, w, b), op(e, w.abs(), None) + gamma(n) * op(v.abs(), w.abs(), b.abs())

    def block(v, e, conv):
        conv2d = lambda a, w, b: F.conv2d(a, w, b, padding=conv.padding)
        y, e = linear(v, e, conv.weight.double(), conv.bias.double(), conv2d)
        return F.max_pool2d(F.relu(y), conv.pool), F.max_pool2d(e, conv.pool)

    def bn(v, e, bn):
        shape = (-1,) + (1,) * (v.dim() - 2)
        a = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).view(shape)
        mean, beta = bn.running_mean.double().view(shape), bn.bias.double().view(shape)
        return (v - mean) * a + beta, a.abs() * e + gamma(8) * (a.abs() * (v.abs() + mean.abs()) + beta.abs())

    def fc(v, e, fc, relu=False):
        y, e = linear(v, e, fc.weight.double(), fc.bias.double(), F.linear)
        return (F.relu(y) if relu else y), e

    v = x.double()
    e = torch.zeros_like(v)
    v, e = block(*bn(*block(v, e, model.conv1), model.bn1), model.conv2)
    v, e = bn(*fc(v.flatten(1), e.flatten(1), model.fc1, relu=True), model.bn2)
    v, e = fc(*fc(v, e, model.fc2, relu=True), model.out)
    return e


def test_the_source_model_has_nontrivial_batchnorm():
    m = trained_model()
    for bn in (m.bn1, m.bn2):
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))


def test_uses_the_compiled_op_on_cpu():
    net = trained_model().for_inference()
    if REQUIRE_COMPILED:
        assert net.uses_compiled_op
    assert net.uses_compiled_op == inference.has_compiled_op(torch.device("cpu"))


@pytest.mark.parametrize("kernels", ["fused", "stock"])
@pytest.mark.parametrize("batch", [1, 7, 256])
@pytest.mark.parametrize("device", cpu_isas_and_cuda(compiled=False))
def test_float32_equals_the_eval_model(device, kernels, batch):
    model = trained_model(kernels, device=device)
    net = model.for_inference()
    x = (torch.randn(batch, 1, 28, 28) * 1.2 + 0.2).to(device)
    want = eval_logits(model, x)
    got = net(x)
    assert got.shape == (batch, 10) and got.dtype == torch.float32 and got.device == x.device
    # float32 rounding only: the folded weights round differently from BN's
    # separate multiply-add, so compare against the scale of the logits.
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    # and within float32 rounding of the same weights evaluated in float64
    truth = eval_logits(copy.deepcopy(model).double(), x.double())
    bound = float32_rounding_bound(model, x)
    assert ((got.double() - truth).abs() <= bound).all(), ((got.double() - truth).abs().max(), bound.max())
    assert ((want.double() - truth).abs() <= bound).all()  # the bound holds for the eval model too


@pytest.mark.parametrize("device", cpu_and_cuda(compiled=False))
def test_float64_equals_the_eval_model(device):
    model = trained_model(dtype=torch.float64, device=device)
    net = model.for_inference()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64).to(device)
    got = net(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, eval_logits(model, x), rtol=1e-10, atol=1e-12)


def test_the_operator_path_equals_the_operator_by_operator_path():
    # CPU only: elsewhere the operator-by-operator path is the only one.
    net = trained_model().for_inference()
    x = torch.randn(9, 1, 28, 28)
    torch.testing.assert_close(net(x), net._forward_ops(x, net.weights()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", cpu_and_cuda(compiled=False))
def test_batch_zero_and_noncontiguous_input(device):
    model = trained_model(device=device)
    net = model.for_inference()
    assert net(torch.empty(0, 1, 28, 28, device=device)).shape == (0, 10)
    x = torch.randn(6, 1, 28, 56).to(device)[..., ::2]  # strided
    assert not x.is_contiguous()
    torch.testing.assert_close(net(x), eval_logits(model, x.contiguous()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda(compiled=False))
def test_is_a_snapshot_and_leaves_the_model_alone(device):
    model = trained_model(device=device)
    model.train()
    net = model.for_inference()
    assert model.training  # for_inference does not switch the model's mode
    x = torch.randn(3, 1, 28, 28, device=device)
    before = net(x)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
        model.bn1.running_mean.add_(1.0)
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("device", cpu_and_cuda(compiled=False))
def test_no_gradients_and_no_training_mode(device):
    net = trained_model(device=device).for_inference()
    assert not net.training and list(net.parameters()) == []
    out = net(torch.randn(2, 1, 28, 28, device=device))
    assert not out.requires_grad
    with pytest.raises(RuntimeError, match="inference form"):
        net.train()
    assert net.eval() is net
    x = torch.randn(2, 1, 28, 28, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        net(x)
    with torch.no_grad():
        assert net(x).shape == (2, 10)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda d: torch.randn(2, 28, 28, device=d), ValueError, r"input of shape \[N, 1, 28, 28\]"),
        (lambda d: torch.randn(2, 3, 28, 28, device=d), ValueError, r"input of shape \[N, 1, 28, 28\]"),
        (lambda d: torch.randn(2, 1, 32, 32, device=d), ValueError, r"input of shape \[N, 1, 28, 28\]"),
        (lambda d: torch.randn(2, 1, 28, 28, dtype=torch.float64, device=d), TypeError, "dtype torch.float32"),
        (lambda d: torch.zeros(2, 1, 28, 28, dtype=torch.uint8, device=d), TypeError, "dtype torch.float32"),
        (lambda d: torch.randn(2, 1, 28, 28, device="meta"), ValueError, "expected input on {device}"),
        (lambda d: [[0.0]], TypeError, "expected input to be a Tensor"),
    ],
)
@pytest.mark.parametrize("device", cpu_and_cuda(compiled=False))
def test_bad_inputs_name_the_argument(device, make, exc, match):
    net = trained_model(device=device).for_inference()
    with pytest.raises(exc, match=match.format(device=device)):
        net(make(device))


def test_batchnorm_without_running_stats_is_refused():
    model = FashionCNN("fused")
    model.bn2 = torch.nn.BatchNorm1d(120, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        model.for_inference()


@pytest.mark.skipif(not inference.has_compiled_op(torch.device("cpu")), reason="compiled library not loaded")
class TestOperatorChecks:
    """Direct torch.ops calls are checked in C++ too, naming the argument."""

    def args(self):
        net = trained_model().for_inference()
        return [torch.randn(2, 1, 28, 28), *net.weights()]

    def call(self, args):
        return torch.ops.fmnist_ext.fashion_cnn_inference(*args)

    def test_valid_call(self):
        args = self.args()
        assert self.call(args).shape == (2, 10)

    @pytest.mark.parametrize(
        "index, value, exc, match",
        [
            (0, torch.randn(2, 28, 28), ValueError, "expected input to be a 4-D tensor"),
            (0, torch.randn(2, 2, 28, 28), ValueError, r"input.size\(1\)"),
            (0, torch.randn(2, 1, 12, 12), ValueError, "too small"),
            (0, torch.randn(2, 1, 32, 32), ValueError, r"fc1_weight.size\(1\) = 300"),
            (0, torch.zeros(2, 1, 28, 28, dtype=torch.int32), TypeError, "float32 or float64"),
            (5, torch.randn(120, 100), ValueError, r"fc1_weight.size\(1\) = 192"),
            (6, torch.randn(7), ValueError, "fc1_bias of length 120"),
            (10, torch.randn(10, dtype=torch.float64), TypeError, "out_bias to have the dtype"),
            (3, torch.randn(12, 5, 5, 5), ValueError, r"conv2_weight.size\(1\)"),
        ],
    )
    def test_bad_argument(self, index, value, exc, match):
        args = self.args()
        args[index] = value
        with pytest.raises(exc, match=match):
            self.call(args)

    def test_requires_grad_is_refused(self):
        args = self.args()
        args[5] = args[5].clone().requires_grad_()
        with pytest.raises(RuntimeError, match="fc1_weight requires grad"):
            self.call(args)
        with torch.no_grad():
            assert self.call(args).shape == (2, 10)

    def test_registered_for_cpu_only_with_one_schema(self):
        schema = torch.ops.fmnist_ext.fashion_cnn_inference.default._schema
        assert [a.name for a in schema.arguments][:2] == ["input", "conv1_weight"]
        assert torch._C._dispatch_has_kernel_for_dispatch_key(inference.OP_NAME, "CPU")
        assert _library.LOADED


@pytest.mark.parametrize("device", cpu_and_cuda(compiled=False))
@pytest.mark.parametrize("how", ["load_state_dict_assign", "buffer_assignment"])
def test_forward_reads_the_current_buffers(device, how):
    # a cached copy of the weights kept computing after the buffers were replaced
    net = trained_model(device=device).for_inference()
    other = trained_model(steps=5, device=device).for_inference()
    x = torch.randn(3, 1, 28, 28, device=device)
    want = other(x)
    assert not torch.allclose(net(x), want)
    if how == "load_state_dict_assign":
        net.load_state_dict(other.state_dict(), assign=True)
    else:
        for name, t in other.named_buffers():
            setattr(net, name, t)
    torch.testing.assert_close(net(x), want, rtol=0, atol=0)


@pytest.mark.skipif(not inference.has_compiled_op(torch.device("cpu")), reason="compiled library not loaded")
@pytest.mark.parametrize("batch", [1, 5])
def test_opcheck_of_the_whole_model_op(batch):
    # the op had no fake kernel (opcheck's fake-tensor and aot_dispatch checks need one)
    net = trained_model().for_inference()
    torch.library.opcheck(
        torch.ops.fmnist_ext.fashion_cnn_inference.default,
        (torch.randn(batch, 1, 28, 28), *net.weights()),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_export_of_the_inference_form(dtype):
    # torch.export of model.for_inference() failed (no fake kernel for the whole-model op)
    net = trained_model(dtype=dtype).for_inference()
    x = torch.randn(4, 1, 28, 28, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
    if net.uses_compiled_op:
        assert "fashion_cnn_inference" in str(exported.graph)
    y = torch.randn(9, 1, 28, 28, dtype=dtype)
    torch.testing.assert_close(exported.module()(y), net(y), rtol=0, atol=0)
