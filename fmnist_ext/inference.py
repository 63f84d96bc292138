"""The inference form of a trained FashionCNN: `FashionCNN.for_inference()`.

    net = model.for_inference()      # a snapshot of the model's current weights
    logits = net(images)             # == model.eval()(images), float32 rounding aside

What changes against the eval-mode model (same function, fewer operations):

* BatchNorm folded away. In eval mode BatchNorm is a per-channel affine map
  y = a * x + c (a = gamma / sqrt(running_var + eps), c = beta - a * mean).
  bn1 sits between conv block 1 and conv block 2, which has no padding, so
  conv2(a * x + c) = conv(x, w2 * a) + (b2 + sum w2 * c): exact, the shift
  reaches every output position through all taps. bn2 sits between
  relu(fc1) and fc2: fc2(a * h + c) = (W2 * a) h + (b2 + W2 c). The folding
  is computed in float64 and rounded once to the model's dtype.
* One operator call. On the CPU with the compiled library the whole forward
  is one C++ op (torch.ops.fmnist_ext.fashion_cnn_inference: both fused conv
  blocks, then the three Linear layers), because at batch 1 the eval model's
  time is the per-operator dispatch and Python module overhead, not the
  arithmetic. Elsewhere (CUDA, the pure-PyTorch fallback) the same folded
  model runs operator by operator.

It is an inference form: no gradients (it refuses inputs that require them
while grad mode is on, and holds its weights as buffers), no training mode
(`train()` raises), and a snapshot (later training of the source model does
not change it; call for_inference() again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .op import conv_relu_maxpool2d, uses_compiled_kernels
from .op._dispatch import below_autograd, without_autograd
from .op._library import OP_NAMESPACE, has_kernel

# The whole-model CPU op (csrc/fashion_cnn_inference.cpp), in the library the fused op's kernels come from.
OP_NAME = "fmnist_ext::fashion_cnn_inference"
INPUT_SHAPE = (1, 28, 28)
_PARAM_NAMES = (
    "conv1_weight",
    "conv1_bias",
    "conv2_weight",
    "conv2_bias",
    "fc1_weight",
    "fc1_bias",
    "fc2_weight",
    "fc2_bias",
    "out_weight",
    "out_bias",
)


def has_compiled_op(device: torch.device) -> bool:
    """True when the whole-model C++ op runs for tensors on `device`."""
    return device.type == "cpu" and _CPU_OP


# Read once (the library is loaded by now): forward asks at every call, and a plain bool traces.
# uses_compiled_kernels first: without the compiled library the op is not registered at all.
_CPU_OP = uses_compiled_kernels("cpu") and has_kernel(OP_NAME, "CPU")
# The op's overload, looked up once (torch.ops attribute lookups cost microseconds per call).
_OP = torch.ops.fmnist_ext.fashion_cnn_inference.default if _CPU_OP else None


def _register_fake() -> None:
    """The op's fake kernel (torch.compile, torch.export, FakeTensor tracing): the same
    computation operator by operator, on fake tensors (their shapes, dtypes and checks)."""

    @torch.library.register_fake(OP_NAME)
    def _fashion_cnn_inference_fake(input, *weights):
        return FashionCNNInference._forward_ops(input, weights)


def _bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) in float64 with bn(x) == a * x + c per channel, in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"for_inference: {bn} has no running statistics (track_running_stats=False), "
            "so its eval-mode output depends on the batch and cannot be folded"
        )
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    a = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.detach().double()
    c = -mean * a
    if bn.bias is not None:
        c = c + bn.bias.detach().double()
    return a, c


def _bias64(layer: nn.Module, n: int, like: torch.Tensor) -> torch.Tensor:
    b = getattr(layer, "bias", None)
    return b.detach().double() if b is not None else torch.zeros(n, dtype=torch.float64, device=like.device)


def fold(model) -> dict[str, torch.Tensor]:
    """The folded weights of a FashionCNN (see the module docstring), in its dtype."""
    dtype = model.conv1.weight.dtype
    a1, c1 = _bn_affine(model.bn1)
    w2 = model.conv2.weight.detach().double()
    b2 = _bias64(model.conv2, w2.shape[0], w2)
    a2, c2 = _bn_affine(model.bn2)
    f2 = model.fc2.weight.detach().double()
    folded = {
        "conv1_weight": model.conv1.weight.detach().double(),
        "conv1_bias": _bias64(model.conv1, model.conv1.weight.shape[0], w2),
        "conv2_weight": w2 * a1.view(1, -1, 1, 1),
        "conv2_bias": b2 + (w2 * c1.view(1, -1, 1, 1)).sum((1, 2, 3)),
        "fc1_weight": model.fc1.weight.detach().double(),
        "fc1_bias": _bias64(model.fc1, model.fc1.weight.shape[0], w2),
        "fc2_weight": f2 * a2.view(1, -1),
        "fc2_bias": _bias64(model.fc2, f2.shape[0], w2) + f2 @ c2,
        "out_weight": model.out.weight.detach().double(),
        "out_bias": _bias64(model.out, model.out.weight.shape[0], w2),
    }
    return {k: v.to(dtype).contiguous() for k, v in folded.items()}


class FashionCNNInference(nn.Module):
    """Eval-mode FashionCNN with BatchNorm folded and (on CPU) one C++ op per call.

    Build it with `FashionCNN.for_inference()`. Input: [N, 1, 28, 28] in the
    model's dtype and on its device; output: [N, 10] logits.
    """

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        missing = [n for n in _PARAM_NAMES if n not in weights]
        if missing:
            raise ValueError(f"FashionCNNInference: missing weights {missing}")
        for name in _PARAM_NAMES:
            self.register_buffer(name, weights[name].detach().clone())
        self.training = False

    @classmethod
    def from_model(cls, model) -> FashionCNNInference:
        with torch.no_grad():
            return cls(fold(model))

    def weights(self) -> tuple[torch.Tensor, ...]:
        """The folded weights in the whole-model op's argument order: the module's
        current buffers, read at every call (load_state_dict(assign=True) or an
        assignment replaces them; a cached copy would keep computing with the old
        ones). Straight from _buffers: nn.Module.__getattr__ costs microseconds each."""
        buffers = self._buffers
        return tuple(buffers[n] for n in _PARAM_NAMES)

    def train(self, mode: bool = True) -> FashionCNNInference:
        if mode:
            raise RuntimeError(
                "FashionCNNInference is an inference form (BatchNorm folded, no gradients); "
                "train the FashionCNN it was made from and call for_inference() again"
            )
        return super().train(False)

    @property
    def uses_compiled_op(self) -> bool:
        """True when forward is the single C++ op (CPU, compiled library)."""
        return has_compiled_op(self._buffers["conv1_weight"].device)

    def _check_input(self, input, like: torch.Tensor) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"FashionCNNInference: expected input to be a Tensor, got {type(input).__name__}")
        if input.dim() != 4 or tuple(input.shape[1:]) != INPUT_SHAPE:
            raise ValueError(f"FashionCNNInference: expected input of shape [N, 1, 28, 28], got {list(input.shape)}")
        if input.dtype != like.dtype:
            raise TypeError(
                f"FashionCNNInference: expected input of dtype {like.dtype} (the model's), got {input.dtype}"
            )
        if input.device != like.device:
            raise ValueError(
                f"FashionCNNInference: expected input on {like.device} (the model's device), got {input.device}"
            )
        if input.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "FashionCNNInference: computes no gradients, but input requires grad; "
                "use torch.no_grad() or the FashionCNN itself"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weights = self.weights()
        self._check_input(input, weights[0])
        if has_compiled_op(weights[0].device):
            if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(w.requires_grad for w in weights)):
                return _OP(input, *weights)  # through its Autograd kernel (which refuses the latter)
            # _check_input did what the op's Autograd kernel checks; skipping that
            # Python kernel saves about a third of a batch-1 call.
            return without_autograd(_OP, input, *weights)
        return self._forward_ops(input, weights)

    @staticmethod
    def _forward_ops(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The same computation operator by operator (CUDA, or no compiled library)."""
        c1w, c1b, c2w, c2b, f1w, f1b, f2w, f2b, ow, ob = weights
        with torch.no_grad():
            x = conv_relu_maxpool2d(x, c1w, c1b, 0, 2)
            x = conv_relu_maxpool2d(x, c2w, c2b, 0, 2)
            x = F.relu(F.linear(torch.flatten(x, 1), f1w, f1b))
            x = F.relu(F.linear(x, f2w, f2b))
            return F.linear(x, ow, ob)

    def extra_repr(self) -> str:
        w = self._buffers["conv1_weight"]
        return f"dtype={w.dtype}, device={w.device}, compiled_op={self.uses_compiled_op}"


def _autograd_kernel(keyset, input, *weights):
    """The op's Autograd kernel: it computes no gradients, so it refuses inputs that
    require them while grad mode is on (the stable ABI the C++ kernel is built on
    cannot read requires_grad), then runs the kernel below Autograd (which also
    gives the kernel's ValueError / TypeError their type)."""
    if torch.is_grad_enabled():
        for name, t in zip(("input", *_PARAM_NAMES), (input, *weights)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(
                    f"fashion_cnn_inference: computes no gradients, but {name} requires grad; "
                    "call it under torch.no_grad() or train the FashionCNN instead"
                )
    return below_autograd(torch.ops.fmnist_ext.fashion_cnn_inference.default, keyset, input, *weights)


_lib = None


def _register_autograd() -> None:
    global _lib
    _lib = torch.library.Library(OP_NAMESPACE, "IMPL")  # keeps the registration alive
    _lib.impl("fashion_cnn_inference", _autograd_kernel, "Autograd", with_keyset=True)


if _CPU_OP:
    _register_fake()
    _register_autograd()
