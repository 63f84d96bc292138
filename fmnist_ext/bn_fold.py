"""Training-mode BatchNorm2d folded into the next conv block (fused model, CPU).

In training mode bn1 normalises block 1's output h with the batch's own
moments: bn1(h) = a * (h - mean) + beta per channel, a = gamma / sqrt(var +
eps). Block 2 has no padding, so every output of its convolution sums all
taps over in-range positions and

    conv2(a * (h - mean) + beta) = conv(h - mean, W2 * a) + (b2 + sum_{ci,i,j} W2[:, ci, i, j] * beta[ci])

exactly (in exact arithmetic). So the fused op runs on the centred h with
folded weights [12, 6, 5, 5] and bias [12], and autograd over those tiny
tensors gives gamma's, beta's, W2's and b2's gradients; h's gradient is
block 2's grad_input (with the folded weights), through the centring, plus
the moments' backward.

CENTRED: h is centred before it is scaled, as BatchNorm itself computes. The
algebraically equal conv(h, W2 * a) + W2 * (beta - a * mean) sums terms of
size a * |h| that cancel down to a * |h - mean|: when a channel's mean is
large against its spread (mean/std 250), float32 lost up to 100x more than
stock in the gradients. Centred, every sum the fold makes
is one stock makes too, and its error obeys the same bound: for the logits
and every gradient, |Q_float32 - Q_float64| <= 4 * spread(Q), spread being
how far the float64 step moves when every value it computes is moved by u
(= 2**-24) times its sum of |terms| (tests/rounding_bounds.py derives it;
tests/app/test_bn_fold.py checks it, on plain data and on a mean of 250 std).
The price is one elementwise pass over h (and its gradient's sum).

What it saves: nn.BatchNorm2d's forward and backward over the full
[N, 6, 12, 12] activation (its normalised copy, and a backward of several
passes). What is left of the full-size work: one read of h for its moments
(fmnist_ext.op.moments.channel_moments, float64 sums) and one elementwise
pass in their backward, which adds the moments' part of h's gradient in
place into block 2's grad_input (_MomentsOfBlockInput below) instead of
allocating its own full-size gradient for autograd to add.

The running statistics are updated as nn.BatchNorm2d does (momentum, or
the cumulative average when momentum is None; unbiased variance), under
no_grad. The model uses this path only where it is exact and the kernels
exist (FashionCNN.forward says when); everywhere else bn1 runs as usual.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .op import FusedConvReLUMaxPool2d, conv_relu_maxpool2d, uses_compiled_kernels
from .op._torch_internals import functorch_active, global_module_hooks, in_dual_level
from .op.moments import backward_formula, channel_moments, has_compiled_kernel


def applies(bn: nn.Module, conv: nn.Module, h: torch.Tensor) -> bool:
    """True when bn -> conv can run folded on h: provably the computation of
    bn(h) then conv(...) (both modules of exactly their types, calls that
    would run nothing but their forward, plain parameters: see runs_plain),
    a training-mode BatchNorm2d with affine parameters and running
    statistics, a conv block without padding, h a float CPU tensor with the
    compiled moments kernel, more than one value per channel, outside
    autocast and torch.func."""
    return (
        type(bn) is nn.BatchNorm2d
        and type(conv) is FusedConvReLUMaxPool2d
        and runs_plain(bn)
        and runs_plain(conv)
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and conv.padding == (0, 0)
        and h.dtype in (torch.float32, torch.float64)
        and uses_compiled_kernels(h.device)
        and has_compiled_kernel(h.device)
        and h.shape[0] * h.shape[2] * h.shape[3] > 1
        and not torch.is_autocast_enabled("cpu")
        and not functorch_active()
    )


_PARAMETERS = ("weight", "bias")


def runs_plain(module: nn.Module) -> bool:
    """True when calling `module` runs its class's forward and nothing else, on
    its own Parameters: no hooks of any kind (the module's, or the global ones
    of torch.nn.modules.module.register_module_*_hook), no forward set on the
    instance, weight and bias plain Parameters (not parametrized, not pruned:
    prune turns weight into a computed attribute fed by a pre-hook).
    nn.Module._call_impl skips its hook machinery under the same conditions;
    torch has no public way to ask for the global hooks, hence the private
    names, read here only."""
    return (
        not (module._forward_hooks or module._forward_pre_hooks)
        and not (module._backward_hooks or module._backward_pre_hooks)
        and not global_module_hooks()
        and "forward" not in vars(module)
        and not parametrize.is_parametrized(module)
        and all(type(module._parameters.get(n)) in (nn.Parameter, type(None)) for n in _PARAMETERS)
        and all(n in module._parameters for n in _PARAMETERS)
    )


@torch.no_grad()
def update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """What nn.BatchNorm2d's training forward does to its buffers."""
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1.0 - factor).add_(mean.detach(), alpha=factor)
    bn.running_var.mul_(1.0 - factor).add_(var.detach() * (count / (count - 1)), alpha=factor)


class _MomentsOfBlockInput(torch.autograd.Function):
    """(h', mean, var) = (h, channel moments of h), with h' (a view of h) for
    block 2 alone. h's gradient is then block 2's grad_input plus the
    moments' part; the backward adds the latter in place into the former,
    which is a fresh tensor of block 2's backward that nothing else holds
    (h' has no other consumer)."""

    @staticmethod
    def forward(ctx, h):
        ctx.set_materialize_grads(False)
        mean, var = torch.ops.fmnist_ext.channel_moments(h)
        ctx.save_for_backward(h, mean)
        return h.view_as(h), mean, var

    @staticmethod
    def backward(ctx, grad_h, grad_mean, grad_var):
        h, mean = ctx.saved_tensors
        if grad_mean is None and grad_var is None:
            return grad_h
        if grad_h is None:
            return torch.ops.fmnist_ext._channel_moments_backward(grad_mean, grad_var, h, mean)
        if torch.is_grad_enabled():  # create_graph: differentiable ops, nothing in place
            return grad_h + backward_formula(grad_mean, grad_var, h, mean)
        torch.ops.fmnist_ext._channel_moments_backward_add_(grad_h, grad_mean, grad_var, h, mean)
        return grad_h


def _moments(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if torch.is_grad_enabled() and h.requires_grad and not in_dual_level():
        return _MomentsOfBlockInput.apply(h)
    # no gradient wanted, or forward-mode AD (channel_moments carries tangents)
    return (h, *channel_moments(h))


def bn_conv_block(bn: nn.BatchNorm2d, conv: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """conv(bn(h)) with bn in training mode, folded (see the module docstring)."""
    h, mean, var = _moments(h)
    update_running_stats(bn, mean, var, h.shape[0] * h.shape[2] * h.shape[3])
    a = bn.weight * torch.rsqrt(var + bn.eps)
    # Centred before it is scaled, as BatchNorm itself computes (see CENTRED in the module docstring).
    centred = h - mean.view(1, -1, 1, 1)
    weight = conv.weight * a.view(1, -1, 1, 1)
    bias = torch.mv(conv.weight.sum((2, 3)), bn.bias)
    if conv.bias is not None:
        bias = bias + conv.bias
    return conv_relu_maxpool2d(centred, weight, bias, conv.padding, conv.pool)
