"""Mixed precision: the fused op under `torch.autocast`.

The kernels compute in float32 and float64 only. Under autocast (cpu
bfloat16; cuda float16/bfloat16) the op behaves like torchvision's ops: its
floating inputs are cast to float32, it runs with autocast off, and its
output comes back in the autocast dtype, like the stock conv2d it replaces
(so the next layer sees what it would see in a stock model). float64 inputs
are left alone, as autocast leaves float64 alone for stock ops. The casts
are ordinary autograd ops, so gradients flow back in the inputs' dtypes.

Outside autocast a half-precision input is refused with a TypeError naming
its dtype (_args.check_args): computing it silently in another precision would
hide the user's mistake.
"""

from __future__ import annotations

import torch

from . import _library
from ._torch_internals import autocast_key, excluding_key

_lib = torch.library.Library(_library.OP_NAMESPACE, "IMPL")  # keeps the registrations alive
_FORWARD = torch.ops.fmnist_ext.conv_relu_maxpool2d.default
DEVICE_TYPES = ("cpu", "cuda")


def casts_to_float32(*tensors) -> bool:
    """True when autocast would run the op in float32 and return the
    autocast dtype: some floating input below float64, none of float64."""
    floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(floats) and all(t.dtype != torch.float64 for t in floats)


def to_float32(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def is_active(device_type: str) -> bool:
    return device_type in DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def _kernel_for(device_type: str):
    key = autocast_key(device_type)

    def kernel(_keyset, input, weight, bias, padding, pool):
        cast = casts_to_float32(input, weight, bias)
        if cast:
            input, weight, bias = to_float32(input), to_float32(weight), to_float32(bias)
        with excluding_key(key):
            out, indices = _FORWARD(input, weight, bias, padding, pool)
        if cast:
            out = out.to(torch.get_autocast_dtype(device_type))
        return out, indices

    return kernel


def register() -> None:
    for device_type in DEVICE_TYPES:
        _lib.impl("conv_relu_maxpool2d", _kernel_for(device_type), autocast_key(device_type), with_keyset=True)
