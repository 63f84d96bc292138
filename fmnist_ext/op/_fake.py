"""Fake (meta) kernels of both ops, so torch.compile and FakeTensor tracing
see their output shapes and dtypes without running them."""

from __future__ import annotations

import torch

from . import _library
from ._args import check_args, check_backward_args, index_dtype


def register() -> None:
    @torch.library.register_fake(_library.FORWARD_OP)
    def _conv_relu_maxpool2d_fake(input, weight, bias, padding, pool):
        n, cout, ph, pw = check_args(input, weight, bias, tuple(padding), pool)
        out = input.new_empty((n, cout, ph, pw))
        indices = input.new_empty((n, cout, ph, pw), dtype=index_dtype(pool))
        return out, indices

    @torch.library.register_fake(_library.BACKWARD_OP)
    def _conv_relu_maxpool2d_backward_fake(grad_output, input, weight, indices, padding, pool, output_mask):
        check_backward_args(grad_output, input, weight, indices, tuple(padding), pool)
        grad_input = input.new_empty(input.shape if output_mask[0] else (0,))
        grad_weight = weight.new_empty(weight.shape if output_mask[1] else (0,))
        grad_bias = weight.new_empty((weight.shape[0],) if output_mask[2] else (0,))
        return grad_input, grad_weight, grad_bias
