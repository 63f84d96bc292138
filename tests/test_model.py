"""The seed CNN: feature size, fused == stock, checkpoints, batching and augmentation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmnist_ext import FusedConvReLUMaxPool2d, checkpoint
from fmnist_ext.batches import Batches, augment, normalize, plan_epoch
from fmnist_ext.model import FashionCNN, StockConvReLUMaxPool2d, conv_output_size, feature_size


@pytest.mark.parametrize(
    "n,f,p,s,expected",
    [
        (28, 5, 0, 1, 24),
        (24, 2, 0, 2, 12),
        (12, 5, 0, 1, 8),
        (8, 2, 0, 2, 4),
        (28, 5, 2, 1, 28),
        (7, 3, 1, 2, 4),
        (5, 2, 0, 2, 2),
    ],
)
def test_conv_output_size(n, f, p, s, expected):
    assert conv_output_size(n, f, p, s) == expected
    # the formula itself, O = floor((n - f + 2p) / s) + 1 (not n - f + 2p / s + 1)
    assert expected == (n - f + 2 * p) // s + 1


def test_conv_output_size_defaults_to_no_padding_and_stride_1():
    assert conv_output_size(28, 5) == conv_output_size(28, 5, 0, 1) == 24


def test_feature_size_is_192_and_matches_the_model():
    assert feature_size() == 192
    m = FashionCNN("stock")
    assert m.fc1.in_features == 192
    with torch.no_grad():
        feats = m.conv2(m.bn1(m.conv1(torch.zeros(2, 1, 28, 28))))
    assert feats.flatten(1).shape[1] == 192


@pytest.mark.parametrize("train_mode", [True, False])
def test_fused_and_stock_same_logits_and_gradients(train_mode):
    torch.manual_seed(0)
    fused, stock = FashionCNN("fused"), FashionCNN("stock")
    assert list(fused.state_dict()) == list(stock.state_dict())
    # perturb BN buffers so eval mode is not trivial, then share all weights
    fused.bn1.running_mean.uniform_(-0.1, 0.1)
    fused.bn2.running_var.uniform_(0.5, 1.5)
    stock.load_state_dict(fused.state_dict())
    fused.train(train_mode)
    stock.train(train_mode)
    x = torch.randn(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    lf, ls = fused(x), stock(x)
    torch.testing.assert_close(lf, ls, rtol=1e-5, atol=1e-5)
    F.cross_entropy(lf, y).backward()
    F.cross_entropy(ls, y).backward()
    for (name, pf), (_, ps) in zip(fused.named_parameters(), stock.named_parameters()):
        torch.testing.assert_close(pf.grad, ps.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_stock_block_stands_on_stock_layers_with_the_fused_blocks_parameters():
    # The stock path is nn.Conv2d + F.relu + F.max_pool2d, not the fused module with another forward.
    assert issubclass(StockConvReLUMaxPool2d, nn.Conv2d)
    assert not issubclass(StockConvReLUMaxPool2d, FusedConvReLUMaxPool2d)
    for args, kwargs in [((1, 6, 5), {}), ((6, 12, 5), {}), ((2, 3, (3, 2)), dict(padding=(1, 0), bias=False, pool=3))]:
        torch.manual_seed(7)
        fused = FusedConvReLUMaxPool2d(*args, **kwargs)
        torch.manual_seed(7)
        stock = StockConvReLUMaxPool2d(*args, **kwargs)
        # same names, shapes and initialisation (same random draws in the same order)
        assert list(fused.state_dict()) == list(stock.state_dict())
        for (name, a), (_, b) in zip(fused.state_dict().items(), stock.state_dict().items()):
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="pool"):
        StockConvReLUMaxPool2d(1, 6, 5, pool=0)


@pytest.mark.parametrize("source,target", [("fused", "stock"), ("stock", "fused")])
def test_state_dict_moves_between_fused_and_stock_models(source, target):
    torch.manual_seed(0)
    trained = FashionCNN(source)
    trained(torch.randn(32, 1, 28, 28)).sum().backward()  # move the BatchNorm statistics off their init
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.manual_seed(1)  # a differently initialised target: the load must replace every weight
    other = FashionCNN(target)
    other.load_state_dict(trained.state_dict())  # strict: same keys and shapes
    trained.eval()
    other.eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(other(x), trained(x), rtol=1e-5, atol=1e-5)


def test_fused_and_stock_models_initialise_identically():
    torch.manual_seed(3)
    fused = FashionCNN("fused")
    torch.manual_seed(3)
    stock = FashionCNN("stock")
    for (name, a), (_, b) in zip(fused.state_dict().items(), stock.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_round_trip_loads_weights_only(tmp_path):
    torch.manual_seed(1)
    m = FashionCNN("fused")
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10)
    x = torch.randn(8, 1, 28, 28)
    m(x).sum().backward()
    opt.step()
    sched.step()
    gen = torch.Generator().manual_seed(3)
    path = tmp_path / "ck.pt"
    checkpoint.save(
        path,
        {
            "model": m.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": checkpoint.rng_state(gen),
            "epoch": 1,
            "step": 0,
            "config": {"lr": 0.01},
            "kernels": "fused",
        },
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)  # loadable the strict way
    assert raw["epoch"] == 1 and raw["config"] == {"lr": 0.01}
    ck = checkpoint.load(path)
    for kernels in ("fused", "stock"):
        m2 = checkpoint.model_from(ck, kernels)
        assert m2.kernels == kernels
        m.eval()
        torch.testing.assert_close(m2(x), m(x), rtol=1e-5, atol=1e-5)
    gen2 = torch.Generator()
    checkpoint.set_rng_state(ck["rng"], gen2)
    assert torch.equal(torch.randperm(50, generator=gen2), torch.randperm(50, generator=gen))
    opt2 = torch.optim.AdamW(FashionCNN().parameters(), lr=0.01)
    opt2.load_state_dict(ck["optimizer"])


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None])
def test_bad_checkpoint_refused(tmp_path, content):
    path = tmp_path / "ck.pt"
    if content is None:
        torch.save({"something": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=r"ck\.pt"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="no such"):
        checkpoint.load(tmp_path / "missing.pt")


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
