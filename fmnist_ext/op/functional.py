"""The fused operator as a Python function: `conv_relu_maxpool2d`.

It checks the arguments (_args.py), then calls the compiled op
``torch.ops.fmnist_ext.conv_relu_maxpool2d`` where kernels exist for the
input's device, and the pure-PyTorch reference (reference.py) elsewhere.
"""

from __future__ import annotations

import torch

from . import _library, reference
from ._args import check_args, normalize_padding

if _library.LOADED:
    from . import _autocast


def uses_compiled_kernels(device: torch.device | str) -> bool:
    """True when tensors on `device` run the compiled kernels (not the reference)."""
    return torch.device(device).type in _library.COMPILED_DEVICE_TYPES


def conv_relu_maxpool2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int | tuple[int, int] = 0,
    pool: int = 2,
) -> torch.Tensor:
    """Fused ``max_pool2d(relu(conv2d(input, weight, bias, padding)), pool, pool)``.

    Stride 1, dilation 1, zero padding (an int or a pair (pad_h, pad_w)); the
    pooling window `pool` has stride `pool` and floors like F.max_pool2d.
    float32 and float64; under torch.autocast it computes in float32 and
    returns the autocast dtype. Differentiable with respect to input, weight
    and bias in every autodiff mode (double backward, forward mode).
    Runs the compiled kernels where they exist for the input's device, and the
    pure-PyTorch reference otherwise.
    """
    pad = normalize_padding(padding)
    compiled = isinstance(input, torch.Tensor) and input.device.type in _library.COMPILED_DEVICE_TYPES
    if compiled and _autocast.is_active(input.device.type) and _autocast.casts_to_float32(input, weight, bias):
        # Under autocast the op computes in float32 and returns the autocast
        # dtype (_autocast.py); check the arguments as the kernels will see them.
        check_args(*map(_autocast.to_float32, (input, weight, bias)), pad, pool)
    else:
        check_args(input, weight, bias, pad, pool)
    if compiled:
        out, _ = torch.ops.fmnist_ext.conv_relu_maxpool2d(input, weight, bias, list(pad), pool)
        return out
    return reference.conv_relu_maxpool2d(input, weight, bias, pad, pool)
