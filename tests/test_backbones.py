"""Conv-4 in both forms: max-pooled (Vinyals et al.) and strided (Finn et al.'s Omniglot code)."""

from __future__ import annotations

import re

import pytest
import torch

from fewshot.methods.registry import build_backbone
from fewshot.models.backbones import Conv4


@pytest.mark.parametrize(
    ("pool", "image_shape", "features", "last_map"),
    [
        ("max", (1, 28, 28), 64, (1, 1)),
        ("max", (3, 84, 84), 1600, (5, 5)),
        ("stride", (1, 28, 28), 64, (2, 2)),
        ("stride", (3, 84, 84), 64, (6, 6)),
    ],
)
def test_conv4_output_matches_out_features(pool, image_shape, features, last_map):
    torch.manual_seed(0)
    net = Conv4(image_shape[0], pool=pool)
    x = torch.randn(3, *image_shape)
    assert net.out_features(image_shape) == features
    assert net(x).shape == (3, features)
    h = x
    for block in net.blocks:
        h = block(h)
    assert tuple(h.shape[2:]) == last_map


def test_strided_conv4_averages_the_last_map_over_space():
    """The features are the spatial mean of the last block's output, as in Finn et al.'s code."""
    torch.manual_seed(0)
    net = Conv4(1, hidden=8, pool="stride").eval()
    x = torch.randn(4, 1, 28, 28)
    h = x
    for block in net.blocks:
        assert len(block) == 3 and block[0].stride == (2, 2)
        h = block(h)
    torch.testing.assert_close(net(x), h.mean(dim=(2, 3)))


def test_build_backbone_by_name():
    net, features = build_backbone("conv4-strided", (1, 28, 28))
    assert isinstance(net, Conv4) and net.pool == "stride" and features == 64
    with pytest.raises(ValueError, match="conv4-strided"):
        build_backbone("mlp", (1, 28, 28))
    with pytest.raises(ValueError, match="pool must be 'max' or 'stride'"):
        Conv4(pool="avg")  # type: ignore[arg-type]


# ---------------------------------------------------------------- images too small


@pytest.mark.parametrize(
    ("depth", "image_shape", "smallest"), [(4, (1, 15, 15), 16), (4, (3, 84, 15), 16), (2, (1, 3, 8), 4)]
)
def test_conv4_refuses_images_too_small_for_its_pools(depth, image_shape, smallest):
    """Like ResNet12.out_features: a named ValueError, not 0 features and a max_pool2d crash later."""
    net = Conv4(image_shape[0], hidden=8, depth=depth)
    shape = re.escape(str(tuple(image_shape)))
    with pytest.raises(ValueError, match=rf"{shape} are too small.*at least {smallest} pixels a side"):
        net.out_features(image_shape)
    net.out_features((image_shape[0], smallest, smallest))  # the smallest size is accepted
    assert Conv4(image_shape[0], hidden=8, depth=depth, pool="stride").out_features(image_shape) == 8


def test_build_backbone_refuses_images_too_small_for_conv4():
    with pytest.raises(ValueError, match=r"\(1, 15, 15\).*at least 16 pixels"):
        build_backbone("conv4", (1, 15, 15))
