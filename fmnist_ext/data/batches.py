"""Batches from a whole split held in uint8 tensors on the training device.

No per-image Python: an epoch is one permutation (from a seeded CPU
generator, so it is the same on every device and every DDP rank), batches are
index slices of it, gathered, augmented and normalised on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dataset import MEAN, STD
from .idx import IMAGE_SIZE


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), scaled to [0,1] and standardised."""
    return images_u8.unsqueeze(1).to(torch.float32).div_(255.0).sub_(MEAN).div_(STD)


@dataclass
class EpochPlan:
    """The random choices of one epoch, all drawn up front from the generator,
    so a resumed epoch can skip its first batches exactly."""

    order: torch.Tensor  # int64 indices into the split (this rank's shard)
    shift: torch.Tensor | None  # int64 (n, 2): crop offsets in [0, 2*pad]
    flip: torch.Tensor | None  # bool (n,)


def plan_epoch(
    n: int,
    generator: torch.Generator,
    shuffle: bool = True,
    crop_pad: int = 0,
    flip: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> EpochPlan:
    """Draw the epoch's order and augmentation; shard them across ranks.

    Every rank draws the same numbers (same generator state) and keeps every
    world_size-th element from `rank`; the tail that does not divide evenly is
    dropped so all ranks run the same number of steps.
    """
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    shift = torch.randint(0, 2 * crop_pad + 1, (n, 2), generator=generator) if crop_pad > 0 else None
    flips = torch.rand(n, generator=generator) < 0.5 if flip else None
    if world_size > 1:
        keep = (n // world_size) * world_size
        sel = slice(rank, keep, world_size)
        order = order[sel]
        shift = shift[sel] if shift is not None else None
        flips = flips[sel] if flips is not None else None
    return EpochPlan(order, shift, flips)


def augment(images_u8: torch.Tensor, shift: torch.Tensor | None, flip: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Batched random crop (zero padding `pad`, offsets `shift`) and horizontal
    flip, as one gather on the device. images_u8: (B, 28, 28)."""
    if shift is None and flip is None:
        return images_u8
    b, device = images_u8.shape[0], images_u8.device
    ar = torch.arange(IMAGE_SIZE, device=device)
    if shift is not None:
        x = torch.nn.functional.pad(images_u8, (pad, pad, pad, pad))
        dy, dx = shift[:, 0].to(device), shift[:, 1].to(device)
    else:
        x = images_u8
        dy = dx = torch.zeros(b, dtype=torch.long, device=device)
    cols = ar.expand(b, IMAGE_SIZE)
    if flip is not None:
        cols = torch.where(flip.to(device)[:, None], IMAGE_SIZE - 1 - cols, cols)
    rows = ar[None, :] + dy[:, None]
    cols = cols + dx[:, None]
    bi = torch.arange(b, device=device)[:, None, None]
    return x[bi, rows[:, :, None], cols[:, None, :]]


def batch_count(n: int, batch_size: int) -> int:
    """Batches in an epoch of n images. The rule: a final batch that would hold
    a single image joins the previous batch instead (which then has
    batch_size + 1 images): BatchNorm cannot train on one image, and no image
    is dropped. n = 1 gives one batch of one image; the caller refuses that."""
    count = -(-n // batch_size)
    return count - 1 if count > 1 and n % batch_size == 1 else count


class Batches:
    """Iterate (inputs, targets) batches of one epoch plan, starting at batch
    `start`; the last batch follows batch_count's rule."""

    def __init__(self, images_u8, labels, plan: EpochPlan, batch_size: int, crop_pad: int = 0, start: int = 0):
        device = images_u8.device
        self.images, self.labels = images_u8, labels
        # The epoch's plan moves to the training device once; batches are slices of it there.
        self.plan = EpochPlan(*(t.to(device) if t is not None else None for t in (plan.order, plan.shift, plan.flip)))
        self.batch_size, self.crop_pad, self.start = batch_size, crop_pad, start

    def __len__(self) -> int:
        return max(0, batch_count(self.plan.order.numel(), self.batch_size) - self.start)

    def __iter__(self):
        n, bs = self.plan.order.numel(), self.batch_size
        count = batch_count(n, bs)
        for b in range(self.start, count):
            i, j = b * bs, (n if b == count - 1 else (b + 1) * bs)
            idx = self.plan.order[i:j]
            x = self.images[idx]
            shift = self.plan.shift[i:j] if self.plan.shift is not None else None
            flip = self.plan.flip[i:j] if self.plan.flip is not None else None
            x = augment(x, shift, flip, self.crop_pad)
            yield normalize(x), self.labels[idx]


def eval_batches(images_u8, labels, batch_size: int = 2000):
    """Sequential batches for evaluation (no shuffling, no augmentation)."""
    for i in range(0, labels.shape[0], batch_size):
        yield normalize(images_u8[i : i + batch_size]), labels[i : i + batch_size]
