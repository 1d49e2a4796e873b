"""ResNet-12 backbone: output sizes on both benchmark image shapes, and training signal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewshot.models.resnet import ResNet12

SMALL = (8, 12, 16, 20)


@pytest.mark.parametrize(
    ("image_shape", "flat_features"),
    [((3, 84, 84), 640 * 5 * 5), ((1, 28, 28), 640 * 1 * 1)],
)
def test_output_shapes_match_out_features(image_shape, flat_features):
    torch.manual_seed(0)
    x = torch.randn(2, *image_shape)
    pooled = ResNet12(in_channels=image_shape[0])
    assert pooled(x).shape == (2, 640)
    assert pooled.out_features(image_shape) == 640

    flat = ResNet12(in_channels=image_shape[0], avg_pool=False)
    assert flat.out_features(image_shape) == flat_features
    assert flat(x).shape == (2, flat_features)


def test_default_size_matches_literature():
    """The standard ResNet-12 (64-160-320-640) has about 12.4M parameters."""
    params = sum(p.numel() for p in ResNet12().parameters())
    assert 12.3e6 < params < 12.5e6


def test_configurable_widths():
    net = ResNet12(in_channels=1, channels=SMALL, avg_pool=False)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, net.out_features((1, 28, 28)))
    assert net.out_features((1, 28, 28)) == 20


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = ResNet12(in_channels=3, channels=SMALL)
    x = torch.randn(4, 3, 84, 84)
    target = torch.randint(0, 5, (4,))
    head = nn.Linear(net.out_features((3, 84, 84)), 5)
    loss = nn.functional.cross_entropy(head(net(x)), target)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_residual_shortcut_and_pooling():
    """Each stage halves the spatial size and the shortcut projects channels."""
    net = ResNet12(in_channels=1, channels=SMALL)
    x = torch.randn(2, 1, 32, 32)
    sizes = []
    for block in net.blocks:
        x = block(x)
        sizes.append(tuple(x.shape[1:]))
    assert sizes == [(8, 16, 16), (12, 8, 8), (16, 4, 4), (20, 2, 2)]
    assert net.blocks[0].shortcut[0].kernel_size == (1, 1)


def test_leaky_relu_slope():
    net = ResNet12(channels=SMALL)
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}


def test_batch_statistics_mode():
    net = ResNet12(in_channels=1, channels=SMALL, track_running_stats=False)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.running_mean is None for m in bns)
    net.eval()
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 20)


def test_too_small_images_raise():
    with pytest.raises(ValueError, match="too small"):
        ResNet12(channels=SMALL).out_features((3, 8, 8))
