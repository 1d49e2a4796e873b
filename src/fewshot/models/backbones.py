"""Backbones: the feature extractors that every method family shares.

Conv-4 is the network of Vinyals et al. (2016) and Finn et al. (2017):
4 x [3x3 conv, BatchNorm, ReLU, 2x2 max-pool]. With 64 filters it maps
28x28x1 to 64 features and 84x84x3 to 1600 (64 x 5 x 5).

``Conv4(pool="stride")`` is the variant that Finn et al.'s code runs on
Omniglot (its ``max_pool`` flag is off there): each 3x3 convolution has
stride 2 instead of a max-pool after it, and the last feature map is
averaged over space, so 28x28x1 maps to 64 features through 14, 7, 4 and 2
pixels square. Its convolutions compute a quarter of the outputs: a
second-order MAML meta-batch takes about half the time.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from torch import nn

Pool = Literal["max", "stride"]


def conv_block(
    in_channels: int, out_channels: int, track_running_stats: bool = True, pool: Pool = "max"
) -> nn.Sequential:
    """One Conv-4 stage: 3x3 conv, BatchNorm, ReLU, then 2x2 max-pool; or a stride-2 conv, no pool.

    Either way H and W halve (rounding down after max-pooling, up with the stride).
    """
    if pool == "max":
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
    if pool == "stride":
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
            nn.ReLU(),
        )
    raise ValueError(f"Conv-4 pool must be 'max' or 'stride', got {pool!r}")


class Conv4(nn.Module):
    """Conv-4 feature extractor; ``hidden=32`` gives the 32-filter variant.

    ``track_running_stats=False`` makes BatchNorm always use the statistics of
    the batch it sees, as MAML does (its episodes are normalised per task).
    ``pool="stride"`` gives Finn et al.'s Omniglot network: stride-2
    convolutions, features averaged over space (``hidden`` of them).
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        depth: int = 4,
        track_running_stats: bool = True,
        pool: Pool = "max",
    ) -> None:
        super().__init__()
        channels = [in_channels] + [hidden] * depth
        self.blocks = nn.Sequential(
            *(conv_block(channels[i], channels[i + 1], track_running_stats, pool) for i in range(depth))
        )
        self.hidden = hidden
        self.depth = depth
        self.pool = pool

    def out_features(self, image_shape: tuple[int, int, int]) -> int:
        """Length of the flattened feature vector for images of ``image_shape`` (C, H, W)."""
        if self.pool == "stride":
            return self.hidden
        _, h, w = image_shape
        for _ in range(self.depth):
            h, w = h // 2, w // 2
        if h == 0 or w == 0:
            raise ValueError(
                f"images of shape {tuple(image_shape)} are too small for Conv-4's {self.depth} "
                f"2x2 max-pools; use images of at least {2**self.depth} pixels a side"
            )
        return self.hidden * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "stride":
            for conv, norm, relu in self.blocks:
                x = relu(norm(conv(x)))
            return x.mean(dim=(2, 3))
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
