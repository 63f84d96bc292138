"""How far float32 rounding may move one FashionCNN training step, computed from
the data in float64 (a helper of test_bn_fold.py: a float32 result is judged
against the float64 truth by this, never by another implementation's error,
which differs between machines: AVX2, AVX-512 and the baseline build sum in
different orders).

The model (first order in u = 2**-24, float32's unit roundoff): a computed
value v = sum_i t_i is off by at most about u * S(v), S(v) = sum_i |t_i| its
sum of |terms| (times a growth factor of the sum's length: n at worst, ~log n
to sqrt n for the blocked sums real kernels use), and these errors reach a
result Q linearly, through the exact network: Q_32 - Q_64 ~= sum_v (dQ/dv) e_v.
The sums of |terms| of each layer, forward and backward:

    conv / linear  S(y) = |W| |x| + |b|;  S(grad x) = |W|^T |grad y|;
                   S(grad W) = sum_i |grad y_i| |x_i|,  S(grad b) = sum_i |grad y_i|
    BatchNorm      x_hat = (x - mean) r, r = 1/sqrt(var + eps), y = gamma x_hat + beta:
                   per element S = |gamma| r |x - mean| + |beta| (it centres, then scales:
                   no |gamma| r |x| term, which is what an uncentred fold adds), and per
                   channel (one rounding shared by the whole channel) |gamma| r |mean| (the
                   rounded mean) + |gamma| |x_hat| (the rounded r); backward per element
                   |gamma| r |grad y|, per channel |gamma| r (mean |grad y| + |x_hat|
                   mean |grad y x_hat| + r |mean| (|mean(grad y x_hat)| + |x_hat| |mean grad y|))

`rounding_spread` evaluates the model: it runs the float64 step with every
layer's output and input gradient moved by u * xi * S (xi = +-1: fixed random
signs, per element or per channel as above, the same on every machine) and
returns, per result, the largest deviation from the unmoved step over a few
sign draws, plus u * S of each gradient's own final sum. A float32
implementation whose roundings are those of the model stays within a small
multiple c of it (test_bn_fold.py states c and what it was checked against);
one that sums larger terms (an uncentred BatchNorm fold: a * h with h's mean
in it) or computes something else (a wrong fold) does not.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

U = 2.0**-24  # float32 unit roundoff
LAYERS = ("conv1", "bn1", "conv2", "fc1", "bn2", "fc2", "out")


def _bn_parts(module, x):
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    mean = x.mean(dims, keepdim=True)
    r = torch.rsqrt(x.var(dims, keepdim=True, correction=0) + module.eps)
    gamma = module.weight.detach().view(shape).abs()
    return dims, mean, r, (x - mean) * r, gamma, module.bias.detach().view(shape).abs()


def _conv_output_grad(block: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gradient at a stock conv block's convolution output, from its pooled output's gradient g."""
    with torch.enable_grad():
        z = F.conv2d(x, block.weight.detach(), block.bias.detach()).requires_grad_()
        (dz,) = torch.autograd.grad(F.max_pool2d(F.relu(z), block.pool, block.pool), z, g)
    return dz


def _forward_terms(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(S per element, S per channel or None) of the module's output on input x."""
    if hasattr(module, "pool"):  # a stock conv block: conv, ReLU, max pool
        s = F.conv2d(x.abs(), module.weight.detach().abs(), module.bias.detach().abs())
        return F.max_pool2d(s, module.pool, module.pool), None
    if isinstance(module, nn.Linear):
        return F.linear(x.abs(), module.weight.detach().abs(), module.bias.detach().abs()), None
    _dims, mean, r, x_hat, gamma, beta = _bn_parts(module, x)
    return gamma * r * (x - mean).abs() + beta, gamma * (r * mean.abs() + x_hat.abs())


def _backward_terms(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(S per element, S per channel or None) of the gradient of the module's input."""
    if hasattr(module, "pool"):
        dz = _conv_output_grad(module, x, g)
        return torch.nn.grad.conv2d_input(x.shape, module.weight.detach().abs(), dz.abs()), None
    if isinstance(module, nn.Linear):
        return g.abs() @ module.weight.detach().abs(), None
    dims, mean, r, x_hat, gamma, _beta = _bn_parts(module, x)
    g_mean, gx_mean = g.mean(dims, keepdim=True).abs(), (g * x_hat).mean(dims, keepdim=True).abs()
    per_channel = (
        g.abs().mean(dims, keepdim=True)
        + x_hat.abs() * (g * x_hat).abs().mean(dims, keepdim=True)
        + r * mean.abs() * (gx_mean + x_hat.abs() * g_mean)
    )
    return gamma * r * g.abs(), gamma * r * per_channel


def _moved(t: torch.Tensor, terms, gen: torch.Generator) -> torch.Tensor:
    """t + u * xi * S, xi = +-1 per element (and per channel for the shared roundings)."""
    per_element, per_channel = terms
    out = t + U * (torch.randint(0, 2, t.shape, generator=gen, dtype=t.dtype) * 2 - 1) * per_element
    if per_channel is not None:
        shape = [1] * t.dim()
        shape[1] = t.shape[1]
        sign = torch.randint(0, 2, shape, generator=gen, dtype=t.dtype) * 2 - 1
        out = out + U * sign * per_channel
    return out


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    return {"logits": logits.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


def rounding_spread(stock_model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 4) -> dict:
    """Per result of the training step on (x, y) (the logits, each parameter's gradient):
    the largest |Q_moved - Q_64| over `draws` sign draws, plus u * S of each gradient's
    final sum. `stock_model`: a stock FashionCNN in training mode (its weights are used)."""
    truth = copy.deepcopy(stock_model).double()
    x = x.double()
    want = _step(copy.deepcopy(truth), x, y)
    spread = {n: torch.zeros_like(t) for n, t in want.items()}
    for draw in range(draws):
        model, gen, inputs = copy.deepcopy(truth), torch.Generator().manual_seed(draw), {}

        def forward(module, args, out, gen=gen, inputs=inputs):
            inputs[module] = args[0].detach()
            return _moved(out, _forward_terms(module, inputs[module]), gen)

        def backward(module, grad_input, grad_output, gen=gen, inputs=inputs):
            if grad_input[0] is None:  # conv1: the images need no gradient
                return None
            return (_moved(grad_input[0], _backward_terms(module, inputs[module], grad_output[0].detach()), gen),)

        handles = [getattr(model, n).register_forward_hook(forward) for n in LAYERS]
        handles += [getattr(model, n).register_full_backward_hook(backward) for n in LAYERS[1:]]
        got = _step(model, x, y)
        for h in handles:
            h.remove()
        for n in spread:
            spread[n] = torch.maximum(spread[n], (got[n] - want[n]).abs())
    for key, s in _gradient_terms(copy.deepcopy(truth), x, y).items():
        spread[key] = spread[key] + U * s
    return spread


def _gradient_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """S of every parameter gradient's final sum: sum_i |grad y_i| |x_i| (x: the layer's
    input; grad y: the gradient at its convolution, linear or normalised output)."""
    seen = {}

    def keep(module, args, out):
        seen[module] = [args[0].detach()]
        out.register_hook(lambda g, module=module: seen[module].append(g.detach()))

    handles = [getattr(model, n).register_forward_hook(keep) for n in LAYERS]
    _step(model, x, y)
    for h in handles:
        h.remove()
    terms = {}
    for name in LAYERS:
        m = getattr(model, name)
        a, g = seen[m]
        if hasattr(m, "pool"):
            dz = _conv_output_grad(m, a, g).abs()
            terms[f"{name}.weight"] = torch.nn.grad.conv2d_weight(a.abs(), m.weight.shape, dz)
            terms[f"{name}.bias"] = dz.sum((0, 2, 3))
        elif isinstance(m, nn.Linear):
            terms[f"{name}.weight"] = g.abs().t() @ a.abs()
            terms[f"{name}.bias"] = g.abs().sum(0)
        else:  # BatchNorm: gamma's gradient sums grad y * x_hat, beta's grad y
            dims, _mean, _r, x_hat, _gamma, _beta = _bn_parts(m, a)
            terms[f"{name}.weight"] = (g.abs() * x_hat.abs()).sum(dims)
            terms[f"{name}.bias"] = g.abs().sum(dims)
    return terms
