"""A run whose numbers stop being finite (a learning rate far too high) is
stopped, not carried on: Diverged is raised at the first non-finite training
loss, before that batch's step, or when an epoch ends with a non-finite
weight, buffer or metric, before its checkpoint is written. The last
checkpoint on disk is then the last finite one, and no NaN reaches a metrics
file (JSON has no NaN) or TensorBoard. Under DDP every process agrees (one
all_reduce), so all stop at the same batch.
"""

from __future__ import annotations

import math

import torch

from .distributed import Dist, all_reduce_sum

EXIT_DIVERGED = 1


class Diverged(Exception):
    """Training produced a non-finite number; `where` says at which point."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def diverged_message(e: Diverged, out) -> str:
    """What the user reads: where it diverged, what was kept, what to try."""
    return (
        f"training diverged ({e.where}); stopped. {out / 'checkpoint.pt'} (if any) holds the last "
        "finite epoch; try a lower --lr"
    )


def check_loss(loss: torch.Tensor, d: Dist, where: str) -> None:
    """Raise Diverged when the batch loss is not finite on any process."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float64).reshape(1)
    if all_reduce_sum(bad, d).item() > 0:
        value = loss.item()
        raise Diverged(f"{where}: the training loss is {value}" if not math.isfinite(value) else where)


def check_epoch(model: torch.nn.Module, record: dict, where: str) -> None:
    """Raise Diverged when a weight, buffer or number of the epoch's record is not finite."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise Diverged(f"{where}: {name} is no longer finite")
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise Diverged(f"{where}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite")
