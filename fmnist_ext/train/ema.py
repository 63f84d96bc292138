"""An exponential moving average (EMA) of a model's weights and buffers.

After every optimizer step, each floating-point parameter and buffer (the
BatchNorm running statistics included) of the shadow copy moves towards the
training model's:

    shadow <- d * shadow + (1 - d) * current,   d = min(decay, (1 + t) / (10 + t))

where t is the number of updates made before this one; the warm-up term keeps
the early average from being dominated by the random initial weights. Integer
buffers (BatchNorm's num_batches_tracked) are copied. The shadow model is what
gets evaluated when EMA is on; training never reads it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _pairs(self, model: nn.Module):
        mine = list(self.module.parameters()) + list(self.module.buffers())
        theirs = list(model.parameters()) + list(model.buffers())
        return zip(mine, theirs)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, m in self._pairs(model):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach(), 1.0 - d)
            else:
                e.copy_(m)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["model"])
