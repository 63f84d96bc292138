"""nn.Module wrapper of the fused operator."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._args import normalize_padding
from .fused_conv import conv_relu_maxpool2d


class FusedConvReLUMaxPool2d(nn.Module):
    """Conv2d (stride 1) -> ReLU -> MaxPool2d(pool) in one fused operator.

    Parameters have nn.Conv2d's names (`weight`, `bias`), shapes and default
    initialisation, so a state_dict moves between this module and a stock
    nn.Conv2d unchanged.
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
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if in_channels < 0 or out_channels < 0 or kh < 1 or kw < 1:
            raise ValueError(
                f"FusedConvReLUMaxPool2d: expected non-negative channel counts and a kernel of at least 1x1, "
                f"got in_channels={in_channels}, out_channels={out_channels}, kernel_size={kernel_size}"
            )
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"FusedConvReLUMaxPool2d: expected pool to be an int >= 1, got {pool!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kh, kw)
        self.padding = normalize_padding(padding)
        self.pool = pool
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_channels, in_channels, kh, kw), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same initialisation as nn.Conv2d.reset_parameters.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()  # in_channels * kernel area
            if fan_in != 0:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return conv_relu_maxpool2d(input, self.weight, self.bias, self.padding, self.pool)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"padding={self.padding}, pool={self.pool}, bias={self.bias is not None}"
        )
