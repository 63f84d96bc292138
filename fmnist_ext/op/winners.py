"""The saved winners as pure-PyTorch gather/scatter, for the derivative rules
that the kernels do not compute (forward-mode AD, double backward).

The forward op returns, per pooled cell, the winner's position j = r*pool + c
inside its pool window, or pool*pool where no gradient flows (see
csrc/index_math.h). Given that, the fused block is locally linear in its
convolution output: out = gather(conv(input, weight) + bias) at the winners,
0 elsewhere. Every higher derivative follows from `gather_winners` and its
adjoint `scatter_winners`, both ordinary differentiable PyTorch ops.
An index outside the window counts as "no gradient", as in the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _slot(indices: torch.Tensor, pool: int) -> torch.Tensor:
    """indices as int64 gather positions; pool*pool (an extra zero slot) for
    "no gradient" and for anything outside the window."""
    j = indices.long()
    return torch.where((j >= 0) & (j < pool * pool), j, pool * pool).unsqueeze(-1)


def gather_winners(conv: torch.Tensor, indices: torch.Tensor, pool: int) -> torch.Tensor:
    """conv [N, C, OH, OW] -> its value at each window's winner, 0 where no
    gradient flows: [N, C, PH, PW]."""
    n, c = conv.shape[:2]
    ph, pw = indices.shape[2:]
    win = conv[:, :, : ph * pool, : pw * pool].reshape(n, c, ph, pool, pw, pool)
    win = win.permute(0, 1, 2, 4, 3, 5).reshape(n, c, ph, pw, pool * pool)
    win = torch.cat([win, win.new_zeros((n, c, ph, pw, 1))], dim=-1)
    return win.gather(-1, _slot(indices, pool)).squeeze(-1)


def scatter_winners(g: torch.Tensor, indices: torch.Tensor, pool: int, oh: int, ow: int) -> torch.Tensor:
    """The adjoint of gather_winners: g [N, C, PH, PW] placed at the winners
    of an [N, C, OH, OW] zero tensor."""
    n, c, ph, pw = g.shape
    win = g.new_zeros((n, c, ph, pw, pool * pool + 1)).scatter(-1, _slot(indices, pool), g.unsqueeze(-1))
    win = win[..., : pool * pool].reshape(n, c, ph, pw, pool, pool).permute(0, 1, 2, 4, 3, 5)
    full = win.reshape(n, c, ph * pool, pw * pool)
    return F.pad(full, (0, ow - pw * pool, 0, oh - ph * pool))


def conv_size(input: torch.Tensor, weight: torch.Tensor, padding) -> tuple[int, int]:
    return (
        input.shape[2] + 2 * padding[0] - weight.shape[2] + 1,
        input.shape[3] + 2 * padding[1] - weight.shape[3] + 1,
    )


def _sum(terms):
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def forward_tangent(input, weight, indices, padding, pool, t_input, t_weight, t_bias):
    """Tangent of the fused output: the winners' entries of
    conv(t_input, weight) + conv(input, t_weight) + t_bias (None: no tangent)."""
    padding = tuple(padding)
    conv_t = _sum(
        [
            F.conv2d(t_input, weight, None, padding=padding) if t_input is not None else None,
            F.conv2d(input, t_weight, None, padding=padding) if t_weight is not None else None,
            t_bias.view(1, -1, 1, 1) if t_bias is not None else None,
        ]
    )
    if conv_t is None:
        return None
    oh, ow = conv_size(input, weight, padding)
    conv_t = conv_t.expand(input.shape[0], weight.shape[0], oh, ow)
    return gather_winners(conv_t, indices, pool)


def backward_formula(grad_output, input, weight, indices, padding, pool, output_mask):
    """(grad_input, grad_weight, grad_bias) of the fused op in differentiable
    PyTorch ops, the masked-out entries as None. Bilinear in (grad_output,
    input/weight), so its derivatives are the kernels' backward's derivatives."""
    padding = tuple(padding)
    oh, ow = conv_size(input, weight, padding)
    s = scatter_winners(grad_output, indices, pool, oh, ow)
    gi = torch.nn.grad.conv2d_input(input.shape, weight, s, padding=padding) if output_mask[0] else None
    gw = torch.nn.grad.conv2d_weight(input, weight.shape, s, padding=padding) if output_mask[1] else None
    gb = s.sum((0, 2, 3)) if output_mask[2] else None
    return gi, gw, gb
