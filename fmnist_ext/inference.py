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
from .op._library import has_kernel

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
    # uses_compiled_kernels first: without the compiled library the op is not registered at all.
    return device.type == "cpu" and uses_compiled_kernels(device) and has_kernel(OP_NAME, "CPU")


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
        self._cache_params()

    @classmethod
    def from_model(cls, model) -> FashionCNNInference:
        with torch.no_grad():
            return cls(fold(model))

    def _cache_params(self) -> None:
        # Cached once per .to()/.cpu()/.double(): attribute lookups of 10
        # buffers through nn.Module.__getattr__ would cost microseconds per call.
        self._params = tuple(getattr(self, n) for n in _PARAM_NAMES)
        w = self._params[0]
        self._dtype, self._device = w.dtype, w.device
        self._uses_compiled_op = has_compiled_op(w.device)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._cache_params()
        return out

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
        return self._uses_compiled_op

    def _check_input(self, input) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"FashionCNNInference: expected input to be a Tensor, got {type(input).__name__}")
        if input.dim() != 4 or tuple(input.shape[1:]) != INPUT_SHAPE:
            raise ValueError(f"FashionCNNInference: expected input of shape [N, 1, 28, 28], got {list(input.shape)}")
        if input.dtype != self._dtype:
            raise TypeError(
                f"FashionCNNInference: expected input of dtype {self._dtype} (the model's), got {input.dtype}"
            )
        if input.device != self._device:
            raise ValueError(
                f"FashionCNNInference: expected input on {self._device} (the model's device), got {input.device}"
            )
        if input.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "FashionCNNInference: computes no gradients, but input requires grad; "
                "use torch.no_grad() or the FashionCNN itself"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        if self._uses_compiled_op:
            return torch.ops.fmnist_ext.fashion_cnn_inference(input, *self._params)
        return self._forward_ops(input)

    def _forward_ops(self, x: torch.Tensor) -> torch.Tensor:
        """The same computation operator by operator (CUDA, or no compiled library)."""
        c1w, c1b, c2w, c2b, f1w, f1b, f2w, f2b, ow, ob = self._params
        with torch.no_grad():
            x = conv_relu_maxpool2d(x, c1w, c1b, 0, 2)
            x = conv_relu_maxpool2d(x, c2w, c2b, 0, 2)
            x = F.relu(F.linear(torch.flatten(x, 1), f1w, f1b))
            x = F.relu(F.linear(x, f2w, f2b))
            return F.linear(x, ow, ob)

    def extra_repr(self) -> str:
        return f"dtype={self._dtype}, device={self._device}, compiled_op={self._uses_compiled_op}"
