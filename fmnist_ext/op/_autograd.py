"""Autograd of the two compiled operators: backward, double backward, forward mode.

`torch.library.register_autograd` only knows reverse mode: under forward-mode
AD (`torch.func.jvp`/`jacfwd`, `forward_ad.make_dual`) an op registered that
way drops the tangent without a word (the output simply has none). So both
ops get their own Autograd kernel here: an autograd.Function with `backward`
and `jvp`, applied whenever an input requires grad or carries a tangent.

- conv_relu_maxpool2d: backward = the kernels' `_conv_relu_maxpool2d_backward`;
  jvp = the winners' entries of conv(dx, w) + conv(x, dw) + db (winners.py).
- _conv_relu_maxpool2d_backward: its outputs are bilinear in (grad_output,
  input/weight) for fixed winners, so its backward (double backward of the
  fused op, e.g. a gradient penalty) and its jvp are a few convolutions in
  differentiable PyTorch ops, which also carry any higher order. The winners
  are piecewise constant (their derivative is 0), as in stock max_pool2d.
"""

from __future__ import annotations

import torch

from . import _library, winners
from ._dispatch import any_tangent, below_autograd, requires_grad
from ._torch_internals import (
    SingleLevelFunction,
    apply_single_level,
    functorch_active,
    fwd_grad_enabled,
    set_fwd_grad_enabled,
)

_lib = torch.library.Library(_library.OP_NAMESPACE, "IMPL")  # keeps the registrations alive
_FORWARD = torch.ops.fmnist_ext.conv_relu_maxpool2d.default
_BACKWARD = torch.ops.fmnist_ext._conv_relu_maxpool2d_backward.default


def _needs_autograd(tensors) -> bool:
    return requires_grad(tensors) or any_tangent(tensors)


class _Call:
    """How the Autograd kernel was entered: its dispatch keyset and grad modes.

    autograd.Function.forward runs with both grad modes off. Under torch.func,
    the op below this level still has outer levels to pass (e.g. the jvp
    level of torch.func.hessian = jacfwd(jacrev)); they must see the modes the
    user had, as torch.func restores them for its own custom Functions.
    """

    def __init__(self, keyset):
        self.keyset = keyset
        self.grad = torch.is_grad_enabled()
        self.fwd_grad = fwd_grad_enabled()

    def below_autograd(self, op, *args):
        if not functorch_active():
            return below_autograd(op, self.keyset, *args)
        with torch.set_grad_enabled(self.grad), set_fwd_grad_enabled(self.fwd_grad):
            return below_autograd(op, self.keyset, *args)


# The class names become the autograd node names in profiles
# (_ConvReluMaxpool2DBackward): the benchmark charges them to the conv blocks.
# They are applied for one autograd level (see _torch_internals): this is
# already an Autograd kernel, reached after torch.func unwrapped the tensors
# for its level, so they subclass the single-level base of autograd.Function.
class _ConvReluMaxpool2D(SingleLevelFunction):
    @staticmethod
    def forward(call, input, weight, bias, padding, pool):
        return call.below_autograd(_FORWARD, input, weight, bias, padding, pool)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, input, weight, bias, padding, pool = inputs
        _, indices = output
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(input, weight, indices)
        ctx.save_for_forward(input, weight, indices)
        ctx.padding, ctx.pool, ctx.has_bias = list(padding), pool, bias is not None

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        input, weight, indices = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[1], need[2], ctx.has_bias and need[3]]
        gi, gw, gb = _BACKWARD(grad_out.contiguous(), input, weight, indices, ctx.padding, ctx.pool, mask)
        return None, gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None

    @staticmethod
    def jvp(ctx, _call, t_input, t_weight, t_bias, _padding, _pool):
        input, weight, indices = ctx.saved_tensors
        t_out = winners.forward_tangent(input, weight, indices, ctx.padding, ctx.pool, t_input, t_weight, t_bias)
        if t_out is None:
            t_out = torch.zeros_like(indices, dtype=input.dtype)
        return t_out, None


class _ConvReluMaxpool2DBackward(SingleLevelFunction):
    @staticmethod
    def forward(call, grad_output, input, weight, indices, padding, pool, output_mask):
        return call.below_autograd(_BACKWARD, grad_output, input, weight, indices, padding, pool, output_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_output, input, weight, indices, padding, pool, output_mask = inputs
        ctx.mark_non_differentiable(*[o for o, m in zip(output, output_mask) if not m])
        ctx.save_for_backward(grad_output, input, weight, indices)
        ctx.save_for_forward(grad_output, input, weight, indices)
        ctx.padding, ctx.pool, ctx.mask = list(padding), pool, list(output_mask)

    @staticmethod
    def backward(ctx, gg_input, gg_weight, gg_bias):
        g, input, weight, indices = ctx.saved_tensors
        gg_input, gg_weight, gg_bias = (t if m else None for t, m in zip((gg_input, gg_weight, gg_bias), ctx.mask))
        need = ctx.needs_input_grad
        d_g = d_input = d_weight = None
        if need[1]:
            d_g = winners.forward_tangent(input, weight, indices, ctx.padding, ctx.pool, gg_input, gg_weight, gg_bias)
        if (need[2] and gg_weight is not None) or (need[3] and gg_input is not None):
            oh, ow = winners.conv_size(input, weight, ctx.padding)
            s = winners.scatter_winners(g, indices, ctx.pool, oh, ow)
            pad = tuple(ctx.padding)
            if need[2] and gg_weight is not None:
                d_input = torch.nn.grad.conv2d_input(input.shape, gg_weight, s, padding=pad)
            if need[3] and gg_input is not None:
                d_weight = torch.nn.grad.conv2d_weight(gg_input, weight.shape, s, padding=pad)
        return None, d_g, d_input, d_weight, None, None, None, None

    @staticmethod
    def jvp(ctx, _call, t_g, t_input, t_weight, _indices, _padding, _pool, _mask):
        g, input, weight, indices = ctx.saved_tensors
        args = (indices, ctx.padding, ctx.pool, ctx.mask)
        parts = []
        if t_g is not None:
            parts.append(winners.backward_formula(t_g, input, weight, *args))
        if t_input is not None:  # grad_weight depends on input
            parts.append((None, winners.backward_formula(g, t_input, weight, *args)[1], None))
        if t_weight is not None:  # grad_input depends on weight
            parts.append((winners.backward_formula(g, input, t_weight, *args)[0], None, None))
        shapes = (input.shape, weight.shape, weight.shape[:1])
        out = []
        for k, m in enumerate(ctx.mask):
            total = winners._sum([p[k] for p in parts]) if m else None
            if m and total is None:
                total = input.new_zeros(shapes[k])
            out.append(total)  # None for the outputs not computed (mask false)
        return tuple(out)


def _forward_autograd(keyset, input, weight, bias, padding, pool):
    if _needs_autograd((input, weight, bias)):
        return apply_single_level(_ConvReluMaxpool2D, _Call(keyset), input, weight, bias, padding, pool)
    return below_autograd(_FORWARD, keyset, input, weight, bias, padding, pool)


def _backward_autograd(keyset, grad_output, input, weight, indices, padding, pool, output_mask):
    if _needs_autograd((grad_output, input, weight)):
        return apply_single_level(
            _ConvReluMaxpool2DBackward, _Call(keyset), grad_output, input, weight, indices, padding, pool, output_mask
        )
    return below_autograd(_BACKWARD, keyset, grad_output, input, weight, indices, padding, pool, output_mask)


def register() -> None:
    _lib.impl("conv_relu_maxpool2d", _forward_autograd, "Autograd", with_keyset=True)
    _lib.impl("_conv_relu_maxpool2d_backward", _backward_autograd, "Autograd", with_keyset=True)
