"""The fused Conv2d+ReLU+MaxPool2d operator: everything Python adds to the
compiled op ``fmnist_ext::conv_relu_maxpool2d`` (schema in
csrc/conv_relu_maxpool2d.cpp), in the order a call meets it.

- ``conv_relu_maxpool2d``: the function users call. It checks the arguments
  (_args.py), then calls the compiled op where kernels exist for the input's
  device, and the pure-PyTorch reference (reference.py) elsewhere.
- Autocast: the kernels compute in float32 and float64 only. Under autocast
  (cpu bfloat16; cuda float16/bfloat16) the op behaves like torchvision's
  ops: its floating inputs are cast to float32, it runs with autocast off,
  and its output comes back in the autocast dtype, like the stock conv2d it
  replaces. float64 inputs are left alone, as autocast leaves float64 alone
  for stock ops. The casts are ordinary autograd ops, so gradients flow back
  in the inputs' dtypes. Outside autocast a half-precision input is refused
  with a TypeError naming its dtype (_args.check_args).
- Fake kernels of the op and of its backward op, so torch.compile and
  FakeTensor tracing see output shapes and dtypes without running them.
- Autograd: `torch.library.register_autograd` only knows reverse mode: under
  forward-mode AD (`torch.func.jvp`/`jacfwd`, `forward_ad.make_dual`) an op
  registered that way drops the tangent without a word. So both compiled ops
  get their own Autograd kernel: an autograd.Function with `backward` and
  `jvp`, applied whenever an input requires grad or carries a tangent.
  * conv_relu_maxpool2d: backward = the kernels' `_conv_relu_maxpool2d_backward`;
    jvp = the winners' entries of conv(dx, w) + conv(x, dw) + db (winners.py).
  * _conv_relu_maxpool2d_backward: its outputs are bilinear in (grad_output,
    input/weight) for fixed winners, so its backward (double backward of the
    fused op, e.g. a gradient penalty) and its jvp are a few convolutions in
    differentiable PyTorch ops, which also carry any higher order. The
    winners are piecewise constant (their derivative is 0), as in stock
    max_pool2d.

`register()` installs the fake, Autograd and Autocast kernels (op/__init__.py
calls it once the compiled library is loaded).
"""

from __future__ import annotations

import torch

from . import _library, reference, winners
from ._args import check_args, check_backward_args, index_dtype, normalize_padding
from ._dispatch import any_tangent, below_autograd, requires_grad
from ._torch_internals import (
    SingleLevelFunction,
    apply_single_level,
    autocast_key,
    excluding_key,
    functorch_active,
    fwd_grad_enabled,
    set_fwd_grad_enabled,
)

AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
if _library.LOADED:
    _lib = torch.library.Library(_library.OP_NAMESPACE, "IMPL")  # keeps the registrations alive
    _FORWARD = torch.ops.fmnist_ext.conv_relu_maxpool2d.default
    _BACKWARD = torch.ops.fmnist_ext._conv_relu_maxpool2d_backward.default


# --------------------------------------------------------------------------- the function


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
    if compiled and autocast_active(input.device.type) and casts_to_float32(input, weight, bias):
        # Under autocast the op computes in float32 and returns the autocast
        # dtype (below); check the arguments as the kernels will see them.
        check_args(*map(to_float32, (input, weight, bias)), pad, pool)
    else:
        check_args(input, weight, bias, pad, pool)
    if compiled:
        out, _ = torch.ops.fmnist_ext.conv_relu_maxpool2d(input, weight, bias, list(pad), pool)
        return out
    return reference.conv_relu_maxpool2d(input, weight, bias, pad, pool)


# --------------------------------------------------------------------------- autocast


def casts_to_float32(*tensors) -> bool:
    """True when autocast would run the op in float32 and return the
    autocast dtype: some floating input below float64, none of float64."""
    floats = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(floats) and all(t.dtype != torch.float64 for t in floats)


def to_float32(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def autocast_active(device_type: str) -> bool:
    return device_type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


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


def _register_autocast() -> None:
    for device_type in AUTOCAST_DEVICE_TYPES:
        _lib.impl("conv_relu_maxpool2d", _kernel_for(device_type), autocast_key(device_type), with_keyset=True)


# --------------------------------------------------------------------------- fake kernels


def _register_fake() -> None:
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


# --------------------------------------------------------------------------- autograd


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
    _register_fake()
    _register_autocast()
    _lib.impl("conv_relu_maxpool2d", _forward_autograd, "Autograd", with_keyset=True)
    _lib.impl("_conv_relu_maxpool2d_backward", _backward_autograd, "Autograd", with_keyset=True)
