"""The epoch's batches: augmentation, the shuffled plan and its shards, slicing and resuming."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmnist_ext.data.batches import Batches, augment, normalize, plan_epoch


def _augment_reference(images, shift, flip, pad):
    out = []
    for img, (dy, dx), f in zip(images, shift.tolist(), flip.tolist()):
        p = F.pad(img, (pad, pad, pad, pad))[dy : dy + 28, dx : dx + 28]
        out.append(p.flip(-1) if f else p)
    return torch.stack(out)


def test_augment_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 28, 28), generator=g, dtype=torch.uint8)
    shift = torch.randint(0, 5, (32, 2), generator=g)
    flip = torch.rand(32, generator=g) < 0.5
    assert torch.equal(augment(images, shift, flip, 2), _augment_reference(images, shift, flip, 2))
    centred = torch.full((32, 2), 2)
    assert torch.equal(augment(images, centred, None, 2), images)
    assert torch.equal(augment(images, None, torch.ones(32, dtype=torch.bool), 0), images.flip(-1))
    assert torch.equal(augment(images, None, None, 0), images)


def test_epoch_plan_shards_cover_the_permutation():
    def plan(rank, world):
        return plan_epoch(103, torch.Generator().manual_seed(5), True, 2, True, rank, world)

    full = plan(0, 1)
    assert sorted(full.order.tolist()) == list(range(103))
    shards = [plan(r, 3) for r in range(3)]
    assert all(s.order.numel() == 34 for s in shards)
    joined = torch.stack([s.order for s in shards], 1).flatten()
    assert torch.equal(joined, full.order[:102])
    assert torch.equal(torch.stack([s.shift for s in shards], 1).flatten(0, 1), full.shift[:102])
    unshuffled = plan_epoch(10, torch.Generator(), shuffle=False)
    assert torch.equal(unshuffled.order, torch.arange(10))


def test_batches_slice_normalise_and_resume_mid_epoch():
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (50,))
    plan = plan_epoch(50, torch.Generator().manual_seed(0))
    full = list(Batches(images, labels, plan, 16))
    assert [b[0].shape[0] for b in full] == [16, 16, 16, 2]
    x0, y0 = full[0]
    assert x0.dtype == torch.float32 and x0.shape == (16, 1, 28, 28)
    assert torch.equal(y0, labels[plan.order[:16]])
    torch.testing.assert_close(x0, normalize(images[plan.order[:16]]))
    rest = list(Batches(images, labels, plan, 16, start=2))
    assert len(Batches(images, labels, plan, 16, start=2)) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, full[2:]))
