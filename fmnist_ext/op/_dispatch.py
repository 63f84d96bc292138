"""Helpers the ops' Autograd kernels share (fused_conv.py, moments.py,
../inference.py): whether a call needs autodiff, and the redispatch below the
Autograd key when it does not, which also gives the compiled kernels' errors
their Python type back. Imports only torch, so it loads with or without the
compiled library."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from ._torch_internals import below_autograd as _below_autograd
from ._torch_internals import fwd_grad_enabled, in_dual_level
from ._torch_internals import without_autograd as _without_autograd

__all__ = ["any_tangent", "below_autograd", "has_tangent", "kernel_error", "requires_grad"]

# The compiled kernels are on the LibTorch stable ABI, across which only a C++
# exception's message passes: torch raises every one as a RuntimeError. The
# kernels' argument checks start their message with the Python type they mean
# (csrc/stable_api.h, FMNIST_CHECK_VALUE / FMNIST_CHECK_TYPE).
_KERNEL_ERROR_TYPES = (("ValueError: ", ValueError), ("TypeError: ", TypeError))


def kernel_error(exc: RuntimeError) -> Exception | None:
    """The ValueError / TypeError a compiled kernel's check meant by `exc`, with
    its message; None when `exc` is no such check's."""
    message = str(exc)
    for tag, kind in _KERNEL_ERROR_TYPES:
        if message.startswith(tag):
            return kind(message[len(tag) :])
    return None


def below_autograd(op, keyset, *args):
    """Run `op` on the dispatch keys after Autograd (no graph recorded); a
    compiled kernel's ValueError or TypeError is raised as such."""
    try:
        return _below_autograd(op, keyset, *args)
    except RuntimeError as exc:
        typed = kernel_error(exc)
        if typed is None:
            raise
        raise typed from None


def without_autograd(op, *args):
    """Call `op` skipping its Autograd kernel, for a caller that has made that
    kernel's checks itself (a Python Autograd kernel costs more than a small
    op's whole run); errors typed as by below_autograd."""
    try:
        return _without_autograd(op, *args)
    except RuntimeError as exc:
        typed = kernel_error(exc)
        if typed is None:
            raise
        raise typed from None


def has_tangent(t) -> bool:
    return isinstance(t, torch.Tensor) and fwAD.unpack_dual(t, level=0).tangent is not None


def any_tangent(tensors) -> bool:
    """Whether any tensor carries a forward-mode tangent. Tangents exist only
    inside a dual level (forward_ad.dual_level, which torch.func.jvp enters
    too): a global read keeps the common case cheap."""
    return in_dual_level() and fwd_grad_enabled() and any(has_tangent(t) for t in tensors)


def requires_grad(tensors) -> bool:
    """Whether reverse mode would record this call."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
