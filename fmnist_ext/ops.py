"""The fused operator's Python side: argument checks, fake kernels, autograd.

The schema lives in C++ (csrc/conv_relu_maxpool2d.cpp) and the kernels are
registered there per dispatch key. Here we add what torch.library wants from
Python: fake (meta) kernels for the forward and the backward op, so
torch.compile can trace them, and (in _autograd.py, _autocast.py) the Autograd
kernels, whose backward is itself the registered op
``_conv_relu_maxpool2d_backward``, and the Autocast kernels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _library, reference

if _library.LOADED:
    from . import _autocast, _autograd

_FLOAT_DTYPES = (torch.float32, torch.float64)
MAX_POOL_FOR_UINT8_INDEX = 15  # must match csrc/index_math.h


def conv_output_size(n: int, f: int, p: int = 0, s: int = 1) -> int:
    """Convolution output size along one axis: O = floor((n - f + 2p) / s) + 1."""
    return (n - f + 2 * p) // s + 1


def index_dtype(pool: int) -> torch.dtype:
    """dtype of the saved winner indices for a pool window."""
    return torch.uint8 if pool <= MAX_POOL_FOR_UINT8_INDEX else torch.int32


def normalize_padding(padding) -> tuple[int, int]:
    if isinstance(padding, bool):
        raise TypeError(f"padding must be an int or a pair of ints, got {padding!r}")
    if isinstance(padding, int):
        pad = (padding, padding)
    elif isinstance(padding, Sequence) and len(padding) == 2 and all(
        isinstance(p, int) and not isinstance(p, bool) for p in padding
    ):
        pad = (int(padding[0]), int(padding[1]))
    else:
        raise TypeError(f"padding must be an int or a pair of ints, got {padding!r}")
    if pad[0] < 0 or pad[1] < 0:
        raise ValueError(f"padding must be non-negative, got {pad}")
    return pad


def check_args(input, weight, bias, padding: tuple[int, int], pool) -> tuple[int, int, int, int]:
    """Validate the operator's arguments; return the output shape.

    Raises TypeError / ValueError naming the argument, with the same
    conditions as the C++ checks (csrc/checks.h).
    """
    op = "conv_relu_maxpool2d"
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: expected {name} to be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: expected bias to be a Tensor or None, got {type(bias).__name__}")
    if input.dim() != 4:
        raise ValueError(f"{op}: expected input to be a 4-D tensor [N, C_in, H, W], got a {input.dim()}-D tensor")
    if weight.dim() != 4:
        raise ValueError(
            f"{op}: expected weight to be a 4-D tensor [C_out, C_in, kH, kW], got a {weight.dim()}-D tensor"
        )
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: expected input to be float32 or float64, got {input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{op}: expected weight to have the dtype of input ({input.dtype}), got {weight.dtype}")
    if weight.device != input.device:
        raise ValueError(
            f"{op}: expected input and weight on the same device, got input on {input.device} "
            f"and weight on {weight.device}"
        )
    if isinstance(pool, bool) or not isinstance(pool, int):
        raise TypeError(f"{op}: expected pool to be an int, got {pool!r}")
    if pool < 1:
        raise ValueError(f"{op}: expected pool >= 1, got {pool}")
    if padding[0] < 0 or padding[1] < 0:
        raise ValueError(f"{op}: expected padding to be non-negative, got {tuple(padding)}")
    n, cin, h, w = input.shape
    cout, wcin, kh, kw = weight.shape
    if wcin != cin:
        raise ValueError(
            f"{op}: expected weight.size(1) (in-channels) to equal input.size(1) = {cin}, got {wcin}"
        )
    if kh < 1 or kw < 1:
        raise ValueError(f"{op}: expected a kernel of at least 1x1, got weight of spatial size {kh}x{kw}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != cout:
            raise ValueError(
                f"{op}: expected bias to be a 1-D tensor of length C_out = {cout}, got shape {tuple(bias.shape)}"
            )
        if bias.dtype != input.dtype:
            raise TypeError(f"{op}: expected bias to have the dtype of input ({input.dtype}), got {bias.dtype}")
        if bias.device != input.device:
            raise ValueError(f"{op}: expected bias on the device of input ({input.device}), got {bias.device}")
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    if hp < kh or wp < kw:
        raise ValueError(f"{op}: kernel size {kh}x{kw} is larger than the padded input {hp}x{wp}")
    oh, ow = conv_output_size(h, kh, padding[0]), conv_output_size(w, kw, padding[1])
    if pool > oh or pool > ow:
        raise ValueError(f"{op}: pool window {pool} is larger than the convolution output {oh}x{ow}")
    return n, cout, oh // pool, ow // pool


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


if _library.LOADED:

    @torch.library.register_fake(_library.FORWARD_OP)
    def _conv_relu_maxpool2d_fake(input, weight, bias, padding, pool):
        n, cout, ph, pw = check_args(input, weight, bias, tuple(padding), pool)
        out = input.new_empty((n, cout, ph, pw))
        indices = input.new_empty((n, cout, ph, pw), dtype=index_dtype(pool))
        return out, indices

    @torch.library.register_fake(_library.BACKWARD_OP)
    def _conv_relu_maxpool2d_backward_fake(grad_output, input, weight, indices, padding, pool, output_mask):
        check_args(input, weight, None, tuple(padding), pool)
        grad_input = input.new_empty(input.shape if output_mask[0] else (0,))
        grad_weight = weight.new_empty(weight.shape if output_mask[1] else (0,))
        grad_bias = weight.new_empty((weight.shape[0],) if output_mask[2] else (0,))
        return grad_input, grad_weight, grad_bias

    # Backward, double backward and forward-mode AD of both ops (_autograd.py);
    # mixed precision under torch.autocast (_autocast.py).
    _autograd.register()
    _autocast.register()
