"""Helpers the ops' Autograd kernels share (fused_conv.py, moments.py): whether
a call needs autodiff, and the redispatch below the Autograd key when it
does not. Imports only torch, so it loads with or without the compiled
library."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from ._torch_internals import below_autograd, fwd_grad_enabled, in_dual_level

__all__ = ["any_tangent", "below_autograd", "has_tangent", "requires_grad"]


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
