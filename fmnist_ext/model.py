"""The seed's Fashion-MNIST CNN, built from the fused blocks or stock layers.

    conv1: Conv(1->6, 5x5) -> ReLU -> MaxPool 2x2 -> BatchNorm2d(6)
    conv2: Conv(6->12, 5x5) -> ReLU -> MaxPool 2x2
    flatten (12*4*4 = 192) -> Linear(192,120) -> ReLU -> BatchNorm1d(120)
    -> Linear(120,60) -> ReLU -> Linear(60,10)

`kernels="fused"` runs the two conv blocks through the fused operator
(FusedConvReLUMaxPool2d), `kernels="stock"` through stock layers
(StockConvReLUMaxPool2d: nn.Conv2d, then F.relu and F.max_pool2d). Both have
the same parameters under the same state_dict keys, so a checkpoint loads
into either.

In training mode the fused model on the CPU runs bn1 folded into conv2
(fmnist_ext/bn_fold.py: the batch moments, then conv2 with per-batch folded
weights; same function, same running statistics), which saves most of
BatchNorm2d's cost; elsewhere bn1 runs as a layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import bn_fold
from .op import FusedConvReLUMaxPool2d

KERNELS = ("fused", "stock")


def conv_output_size(n: int, f: int, p: int = 0, s: int = 1) -> int:
    """Convolution (or pooling) output size along one axis: floor((n - f + 2p) / s) + 1."""
    return (n - f + 2 * p) // s + 1


class StockConvReLUMaxPool2d(nn.Conv2d):
    """The stock form of the block: an nn.Conv2d (stride 1) whose forward adds
    F.relu and F.max_pool2d(pool, pool).

    It takes FusedConvReLUMaxPool2d's arguments, and nn.Conv2d's parameters
    (`weight`, `bias`) are what the fused module copies (names, shapes,
    initialisation), so the two blocks share their state_dict keys and, built
    after the same torch.manual_seed, their weights.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        pool: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"StockConvReLUMaxPool2d: expected pool to be an int >= 1, got {pool!r}")
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias, device=device, dtype=dtype)
        self.pool = pool

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(super().forward(input)), self.pool, self.pool)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool={self.pool}"


def feature_size(image_size: int = 28, kernel: int = 5, pool: int = 2, blocks: int = 2, channels: int = 12) -> int:
    """Flattened size after the conv blocks: 12 * 4 * 4 = 192 for the seed CNN.

    Each block applies O = floor((n - f + 2p) / s) + 1 with p = 0, s = 1, then a
    pool of window and stride `pool`: O = floor((n - pool) / pool) + 1.
    """
    n = image_size
    for _ in range(blocks):
        n = conv_output_size(n, kernel, 0, 1)
        n = conv_output_size(n, pool, 0, pool)
    return channels * n * n


class FashionCNN(nn.Module):
    def __init__(self, kernels: str = "fused") -> None:
        super().__init__()
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.kernels = kernels
        block = FusedConvReLUMaxPool2d if kernels == "fused" else StockConvReLUMaxPool2d
        self.conv1 = block(1, 6, 5)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = block(6, 12, 5)
        self.fc1 = nn.Linear(feature_size(), 120)
        self.bn2 = nn.BatchNorm1d(120)
        self.fc2 = nn.Linear(120, 60)
        self.out = nn.Linear(60, 10)

    def for_inference(self):
        """An inference form of this model's current weights (fmnist_ext/inference.py).

        Its outputs equal this model's in eval mode (float32 rounding aside):
        BatchNorm is folded into the next layer and, on the CPU, the whole
        forward is one C++ operator. A snapshot without gradients or training
        mode; this model is left as it is.
        """
        from .inference import FashionCNNInference

        return FashionCNNInference.from_model(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.kernels == "fused" and self.training and bn_fold.applies(self.bn1, self.conv2, x):
            x = bn_fold.bn_conv_block(self.bn1, self.conv2, x)
        else:
            x = self.conv2(self.bn1(x))
        x = torch.flatten(x, 1)
        x = self.bn2(F.relu(self.fc1(x)))
        x = F.relu(self.fc2(x))
        return self.out(x)
