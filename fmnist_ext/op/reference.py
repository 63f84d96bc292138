"""The pure-PyTorch reference of the fused operator.

It is the definition the kernels are tested against, and the path the public
API takes where no compiled kernel exists for a device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_relu_maxpool2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: tuple[int, int],
    pool: int,
) -> torch.Tensor:
    """max_pool2d(relu(conv2d(input, weight, bias, padding)), pool, pool)."""
    return F.max_pool2d(F.relu(F.conv2d(input, weight, bias, padding=padding)), pool, pool)
