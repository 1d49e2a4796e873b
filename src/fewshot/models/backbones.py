"""Backbones: the feature extractors that every method family shares.

Conv-4 is the network of Vinyals et al. (2016) and Finn et al. (2017):
4 x [3x3 conv, BatchNorm, ReLU, 2x2 max-pool]. With 64 filters it maps
28x28x1 to 64 features and 84x84x3 to 1600 (64 x 5 x 5).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int, track_running_stats: bool = True) -> nn.Sequential:
    """One Conv-4 stage: 3x3 conv, BatchNorm, ReLU, 2x2 max-pool (halves H and W)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """Conv-4 feature extractor; ``hidden=32`` gives the 32-filter variant.

    ``track_running_stats=False`` makes BatchNorm always use the statistics of
    the batch it sees, as MAML does (its episodes are normalised per task).
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        depth: int = 4,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        channels = [in_channels] + [hidden] * depth
        self.blocks = nn.Sequential(
            *(conv_block(channels[i], channels[i + 1], track_running_stats) for i in range(depth))
        )
        self.hidden = hidden
        self.depth = depth

    def out_features(self, image_shape: tuple[int, int, int]) -> int:
        """Length of the flattened feature vector for images of ``image_shape`` (C, H, W)."""
        _, h, w = image_shape
        for _ in range(self.depth):
            h, w = h // 2, w // 2
        return self.hidden * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU after max-pooling: the same function (ReLU is monotone), on 4x fewer elements.
        for conv, norm, relu, pool in self.blocks:
            x = relu(pool(norm(conv(x))))
        return x.flatten(1)


class Classifier(nn.Module):
    """A backbone followed by a linear head: the network MAML-style methods adapt."""

    def __init__(self, backbone: nn.Module, features: int, ways: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class MLP(nn.Module):
    """The sinusoid-regression network of the MAML paper: 2 hidden layers of 40, ReLU."""

    def __init__(
        self, in_features: int = 1, hidden: int = 40, layers: int = 2, out_features: int = 1
    ) -> None:
        super().__init__()
        dims = [in_features] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            mods += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*mods)
        self.head = nn.Linear(dims[-1], out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
