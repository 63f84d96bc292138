"""The implementations a benchmark row compares, their inputs, and one pass of each.

``stock`` (F.conv2d, F.relu, F.max_pool2d in eager mode) is the baseline of
every ratio; ``fused`` is fmnist_ext.conv_relu_maxpool2d; ``compile`` (the
stock sequence under torch.compile) is built per row by compile_cache.
``reference`` (fmnist_ext's pure-PyTorch fallback) is not one: it is the
stock sequence, and timing it beside stock measured the same thing twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .blocks import BlockSpec

IMPLS = ("fused", "stock", "compile")
QUICK_IMPLS = ("fused", "stock")
# Names --impls refuses, with why (one line, exit 2).
NOT_IMPLS = {
    "reference": "is the same computation as stock (F.conv2d -> F.relu -> F.max_pool2d, the pure-PyTorch "
    "fallback of fmnist_ext), which every row times",
}

# Fashion-MNIST normalisation (train-set mean / std of pixel/255), used to
# turn synthetic uint8 images into realistic inputs.
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530

Impl = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def stock_block(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The stock eager sequence: F.conv2d, F.relu, F.max_pool2d (pool 2, padding 0)."""
    return F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2, 2)


def fused_block(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    import fmnist_ext

    return fmnist_ext.conv_relu_maxpool2d(x, w, b, padding=0, pool=2)


def base_impls() -> dict[str, Impl]:
    """The eager implementations (compile is built per row)."""
    return {"fused": fused_block, "stock": stock_block}


@dataclass
class RowInputs:
    block: BlockSpec
    batch: int
    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    g: torch.Tensor  # fixed random grad_output


def make_inputs(block: BlockSpec, batch: int, device: torch.device, seed: int = 0) -> RowInputs:
    """Inputs like the model's: block 1 gets normalised uint8-like images,
    block 2 gets standard-normal activations; weights and bias have
    nn.Conv2d's default initialisation; grad_output is a fixed random tensor.

    Block 2's activations, weights and bias are rounded to multiples of 2^-6,
    2^-10 and 2^-16 (a change of < 1% of their spread): every product and
    every sum of the convolution is then exact in float32, so fused, stock
    and the float64 yardstick see the same values and the same pool winners.
    With unrounded values a window whose two largest values differ by less
    than float32's rounding (at batch 1000 there are such windows) has a
    different, equally right, winner in each float32 summation order, and
    the gate would refuse a correct backward for it."""
    gen = torch.Generator().manual_seed(seed * 1009 + block.index * 31 + batch)
    shape = (batch, block.cin, block.hw, block.hw)
    if block.index == 1:
        x = torch.randint(0, 256, shape, generator=gen).float().div_(255).sub_(FMNIST_MEAN).div_(FMNIST_STD)
    else:
        x = _round_to(torch.randn(shape, generator=gen).clamp_(-7, 7), 6)
    fan_in = block.cin * block.k * block.k
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) gives the same bound
    w = (torch.rand((block.cout, block.cin, block.k, block.k), generator=gen) * 2 - 1) * bound
    b = (torch.rand((block.cout,), generator=gen) * 2 - 1) * bound
    if block.index == 2:
        w, b = _round_to(w, 10), _round_to(b, 16)
    g = torch.randn((batch, block.cout, block.out_hw, block.out_hw), generator=gen)
    return RowInputs(block, batch, *(t.to(device).contiguous() for t in (x, w, b, g)))


def _round_to(t: torch.Tensor, bits: int) -> torch.Tensor:
    """`t` rounded to a multiple of 2**-bits."""
    return torch.round(t * 2.0**bits) / 2.0**bits


def as_float64(inp: RowInputs) -> RowInputs:
    """The same inputs in float64 (the gate's yardstick is stock computed on these)."""
    return RowInputs(inp.block, inp.batch, *(t.double() for t in (inp.x, inp.w, inp.b, inp.g)))


def pass_runner(fn: Impl, inp: RowInputs, pass_name: str) -> Callable[[], Any]:
    """A no-argument callable doing one `pass_name` of `fn` on `inp`.

    Backward uses torch.autograd.grad with the fixed grad_output (equivalent to
    y.backward(g) without accumulating into .grad)."""
    x, b, g = inp.x, inp.b, inp.g
    if pass_name == "fwd":
        w = inp.w

        def run_fwd():
            with torch.no_grad():
                return (fn(x, w, b),)

        return run_fwd
    w = inp.w.detach().requires_grad_(True)
    bb = b.detach().requires_grad_(True)
    if pass_name == "fwd+bwd":
        xx = x.detach()

        def run_bwd():
            y = fn(xx, w, bb)
            return (y.detach(), *torch.autograd.grad(y, (w, bb), g))

        return run_bwd
    if pass_name == "fwd+bwd+dx":
        xx = x.detach().requires_grad_(True)

        def run_bwd_dx():
            y = fn(xx, w, bb)
            return (y.detach(), *torch.autograd.grad(y, (xx, w, bb), g))

        return run_bwd_dx
    raise ValueError(f"unknown pass {pass_name!r}")


RESULT_NAMES = {
    "fwd": ("output",),
    "fwd+bwd": ("output", "grad_weight", "grad_bias"),
    "fwd+bwd+dx": ("output", "grad_input", "grad_weight", "grad_bias"),
}
