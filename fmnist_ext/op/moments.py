"""Per-channel batch moments as an operator: `channel_moments(x) -> (mean, var)`.

mean and var (biased, i.e. ``torch.var_mean(x, dims, correction=0)``) of a
[N, C] or [N, C, H, W] tensor over every dim but 1, float32/float64. It is
what training-mode BatchNorm needs from the full-size activation; the
FashionCNN folds the rest of BatchNorm2d into the next conv block
(fmnist_ext/bn_fold.py), and nn.BatchNorm2d or torch.var_mean spend several
memory passes' worth of time on these two vectors.

The compiled CPU kernels (csrc/cpu/channel_moments_cpu.cpp, schema in
csrc/channel_moments.cpp) compute them in one read of x with float64 sums;
the backward is the op ``_channel_moments_backward(grad_mean, grad_var, x,
mean)``: grad_x = grad_mean / M + grad_var * 2 (x - mean) / M, one pass;
``_channel_moments_backward_add_(grad_x, ...)`` adds it into a gradient of
x that the caller owns, in place (fmnist_ext/bn_fold.py sums the next
layer's gradient of x with it that way: no autograd add, no new buffer).
Elsewhere (CUDA, no compiled library) `channel_moments` runs
torch.var_mean.

Autodiff: reverse mode through the kernels; double backward through the
same backward formula in differentiable torch ops (the backward op's
Autograd kernel switches to it when its inputs need gradients or carry
tangents); forward mode (a tangent on x) runs torch.var_mean, which carries
tangents. Gradients under torch.func transforms are refused with a clear
error (torch.vmap alone works, through PyTorch's per-sample fallback).
"""

from __future__ import annotations

import torch

from . import _library
from ._dispatch import any_tangent, below_autograd, requires_grad
from ._torch_internals import functorch_active

FORWARD_OP = f"{_library.OP_NAMESPACE}::channel_moments"
BACKWARD_OP = f"{_library.OP_NAMESPACE}::_channel_moments_backward"
BACKWARD_ADD_OP = f"{_library.OP_NAMESPACE}::_channel_moments_backward_add_"
_FLOAT_DTYPES = (torch.float32, torch.float64)
# Read once (the library is loaded by now): a plain bool also keeps torch.compile from breaking the graph.
_CPU_KERNEL = _library.LOADED and _library.has_kernel(FORWARD_OP, "CPU")


def has_compiled_kernel(device: torch.device | str) -> bool:
    """True when channel_moments runs its compiled kernel for tensors on `device` (CPU only)."""
    return _CPU_KERNEL and torch.device(device).type == "cpu"


def reduced_dims(x: torch.Tensor) -> tuple[int, ...]:
    """Every dim but the channel dim 1."""
    return (0,) if x.dim() == 2 else (0, 2, 3)


def check_x(x, op: str = "channel_moments") -> None:
    """Mirror of the C++ checks (csrc/cpu/channel_moments_cpu.cpp): messages name x."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected x to be a Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 4):
        raise ValueError(f"{op}: expected x to be a 2-D [N, C] or 4-D [N, C, H, W] tensor, got a {x.dim()}-D tensor")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: expected x to be float32 or float64, got {x.dtype}")


def check_backward_args(grad_mean, grad_var, x, mean) -> None:
    op = "_channel_moments_backward"
    check_x(x, op)
    c = x.shape[1]
    for name, t in (("mean", mean), ("grad_mean", grad_mean), ("grad_var", grad_var)):
        if t is None and name != "mean":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: expected {name} to be a Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != c:
            raise ValueError(f"{op}: expected {name} to be a 1-D tensor of length C = {c}, got shape {list(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: expected {name} to have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: expected {name} on the device of x ({x.device}), got {t.device}")


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) of x per channel (dim 1), var biased; differentiable."""
    check_x(x)
    if has_compiled_kernel(x.device):
        return torch.ops.fmnist_ext.channel_moments(x)
    var, mean = torch.var_mean(x, reduced_dims(x), correction=0)
    return mean, var


def backward_formula(grad_mean, grad_var, x, mean) -> torch.Tensor:
    """The backward in differentiable torch ops (double backward, forward mode)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = x.numel() // max(x.shape[1], 1)
    grad_x = torch.zeros_like(x)
    if grad_mean is not None:
        grad_x = grad_x + grad_mean.view(shape) / m
    if grad_var is not None:
        grad_x = grad_x + grad_var.view(shape) * (2.0 / m) * (x - mean.view(shape))
    return grad_x


# ---------------------------------------------------------------------------
# Registration: fake kernels and Autograd kernels (only with the compiled library)


# The class name becomes the autograd node name in profiles (_ChannelMomentsBackward).
class _ChannelMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)  # an unused mean or var gives None: skipped, not a zero pass
        mean, var = torch.ops.fmnist_ext.channel_moments(x)  # grad mode is off here: the kernel
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        if grad_mean is None and grad_var is None:
            return None
        return torch.ops.fmnist_ext._channel_moments_backward(grad_mean, grad_var, x, mean)


def _forward_autograd(keyset, x):
    if any_tangent((x,)):
        # Forward mode: the definition itself, which carries the tangent (and any order).
        var, mean = torch.var_mean(x, reduced_dims(x), correction=0)
        return mean, var
    if requires_grad((x,)):
        if functorch_active():
            raise NotImplementedError(
                "channel_moments: gradients under torch.func transforms (grad, jacrev, vjp) are not "
                "supported; use torch.var_mean(x, dims, correction=0)"
            )
        return _ChannelMoments.apply(x)
    return below_autograd(torch.ops.fmnist_ext.channel_moments.default, keyset, x)


def _backward_autograd(keyset, grad_mean, grad_var, x, mean):
    tensors = (grad_mean, grad_var, x, mean)
    if requires_grad(tensors) or any_tangent(tensors):
        # Double backward / forward mode of the backward: the same formula in
        # differentiable ops (mean is the forward's output, so its graph reaches x).
        check_backward_args(grad_mean, grad_var, x, mean)
        return backward_formula(grad_mean, grad_var, x, mean)
    return below_autograd(torch.ops.fmnist_ext._channel_moments_backward.default, keyset, grad_mean, grad_var, x, mean)


def _backward_add_autograd(keyset, grad_x, grad_mean, grad_var, x, mean):
    tensors = (grad_x, grad_mean, grad_var, x, mean)
    if requires_grad(tensors) or any_tangent(tensors):
        # Recorded: the same sum in differentiable ops.
        check_backward_args(grad_mean, grad_var, x, mean)
        grad_x.add_(backward_formula(grad_mean, grad_var, x, mean))
        return
    below_autograd(torch.ops.fmnist_ext._channel_moments_backward_add_.default, keyset, *tensors)
    torch.autograd.graph.increment_version(grad_x)  # modified in place, as autograd's own kernels record


_lib = None


def register() -> None:
    global _lib
    _lib = torch.library.Library(_library.OP_NAMESPACE, "IMPL")  # keeps the registrations alive

    @torch.library.register_fake(FORWARD_OP)
    def _channel_moments_fake(x):
        check_x(x)
        c = x.shape[1]
        return x.new_empty((c,)), x.new_empty((c,))

    @torch.library.register_fake(BACKWARD_OP)
    def _channel_moments_backward_fake(grad_mean, grad_var, x, mean):
        check_backward_args(grad_mean, grad_var, x, mean)
        return x.new_empty(x.shape)

    @torch.library.register_fake(BACKWARD_ADD_OP)
    def _channel_moments_backward_add_fake(grad_x, grad_mean, grad_var, x, mean):
        check_backward_args(grad_mean, grad_var, x, mean)
        if grad_x.shape != x.shape or grad_x.dtype != x.dtype:
            raise ValueError(
                f"_channel_moments_backward_add_: expected grad_x of x's shape and dtype "
                f"({list(x.shape)}, {x.dtype}), got {list(grad_x.shape)}, {grad_x.dtype}"
            )

    _lib.impl("channel_moments", _forward_autograd, "Autograd", with_keyset=True)
    _lib.impl("_channel_moments_backward", _backward_autograd, "Autograd", with_keyset=True)
    _lib.impl("_channel_moments_backward_add_", _backward_add_autograd, "Autograd", with_keyset=True)
