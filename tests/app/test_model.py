"""The seed CNN: feature size, fused == stock, state_dicts shared by both kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmnist_ext import FusedConvReLUMaxPool2d
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
