"""The op's argument checks and output shapes, in Python.

They mirror csrc/checks.h condition for condition and message for message:
the public function checks here before dispatching, so the reference path and
the fake kernels raise the same errors as the compiled kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_FLOAT_DTYPES = (torch.float32, torch.float64)
MAX_POOL_FOR_UINT8_INDEX = 15  # must match csrc/index_math.h


def index_dtype(pool: int) -> torch.dtype:
    """dtype of the saved winner indices for a pool window."""
    return torch.uint8 if pool <= MAX_POOL_FOR_UINT8_INDEX else torch.int32


def normalize_padding(padding) -> tuple[int, int]:
    if isinstance(padding, bool):
        raise TypeError(f"padding must be an int or a pair of ints, got {padding!r}")
    if isinstance(padding, int):
        pad = (padding, padding)
    elif (
        isinstance(padding, Sequence)
        and len(padding) == 2
        and all(isinstance(p, int) and not isinstance(p, bool) for p in padding)
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
        raise ValueError(f"{op}: expected weight.size(1) (in-channels) to equal input.size(1) = {cin}, got {wcin}")
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
    oh, ow = hp - kh + 1, wp - kw + 1  # stride 1
    if pool > oh or pool > ow:
        raise ValueError(f"{op}: pool window {pool} is larger than the convolution output {oh}x{ow}")
    return n, cout, oh // pool, ow // pool


def check_backward_args(grad_output, input, weight, indices, padding: tuple[int, int], pool) -> None:
    """Validate the backward op's arguments (csrc/checks.h check_backward_args):
    grad_output and indices must match the forward's output and input."""
    n, cout, ph, pw = check_args(input, weight, None, padding, pool)
    op = "_conv_relu_maxpool2d_backward"
    if tuple(grad_output.shape) != (n, cout, ph, pw):
        raise ValueError(
            f"{op}: expected grad_output of shape [{n}, {cout}, {ph}, {pw}], got {list(grad_output.shape)}"
        )
    if indices.shape != grad_output.shape:
        raise ValueError(f"{op}: expected indices of shape {list(grad_output.shape)}, got {list(indices.shape)}")
    if indices.dtype != index_dtype(pool):
        raise TypeError(f"{op}: expected indices of dtype {index_dtype(pool)}, got {indices.dtype}")
    if grad_output.dtype != input.dtype:
        raise TypeError(
            f"{op}: expected grad_output to have the dtype of input ({input.dtype}), got {grad_output.dtype}"
        )
    if grad_output.device != input.device or indices.device != input.device:
        raise ValueError(
            f"{op}: expected grad_output and indices on the device of input ({input.device}), "
            f"got grad_output on {grad_output.device} and indices on {indices.device}"
        )
