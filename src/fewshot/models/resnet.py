"""ResNet-12: the deeper backbone of the few-shot literature.

Used by TADAM (Oreshkin et al., 2018), MetaOptNet (Lee et al., 2019) and most
later work on mini-ImageNet: four residual stages, each of three
3x3 conv-BatchNorm-LeakyReLU(0.1) layers with a 1x1 conv shortcut, followed by
a 2x2 max-pool. With the default widths (64, 160, 320, 640) and global average
pooling it maps 84x84x3 and 28x28x1 images alike to 640 features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """One ResNet-12 stage; halves H and W.

    The activation of the third conv is applied after the shortcut is added,
    as in the reference implementations (MetaOptNet, FEAT).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        leaky_slope: float = 0.1,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()

        def conv_bn(cin: int, kernel: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, out_channels, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
            ]

        self.body = nn.Sequential(
            *conv_bn(in_channels, 3),
            nn.LeakyReLU(leaky_slope),
            *conv_bn(out_channels, 3),
            nn.LeakyReLU(leaky_slope),
            *conv_bn(out_channels, 3),
        )
        self.shortcut = nn.Sequential(*conv_bn(in_channels, 1))
        self.act = nn.LeakyReLU(leaky_slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.body(x) + self.shortcut(x)))


class ResNet12(nn.Module):
    """ResNet-12 feature extractor returning flat feature vectors (B, F).

    ``avg_pool=False`` keeps the final spatial map (flattened), e.g. 640x5x5 for
    84x84 inputs. ``track_running_stats=False`` makes BatchNorm use batch
    statistics always, as MAML-style methods do.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 160, 320, 640),
        avg_pool: bool = True,
        leaky_slope: float = 0.1,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) == 0:
            raise ValueError("ResNet12 needs at least one stage width in `channels`")
        widths = [in_channels, *channels]
        self.blocks = nn.Sequential(
            *(
                ResidualBlock(widths[i], widths[i + 1], leaky_slope, track_running_stats)
                for i in range(len(channels))
            )
        )
        self.channels = tuple(channels)
        self.avg_pool = avg_pool
        self._init_weights(leaky_slope)

    def _init_weights(self, leaky_slope: float) -> None:
        """He initialisation for the LeakyReLU convs, identity BatchNorm."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=leaky_slope, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def out_features(self, image_shape: tuple[int, int, int]) -> int:
        """Length of the feature vector for images of ``image_shape`` (C, H, W)."""
        _, h, w = image_shape
        for _ in self.channels:
            h, w = h // 2, w // 2
        if h == 0 or w == 0:
            raise ValueError(
                f"images of shape {tuple(image_shape)} are too small for {len(self.channels)} "
                f"2x2 max-pools; use images of at least {2 ** len(self.channels)} pixels a side"
            )
        return self.channels[-1] if self.avg_pool else self.channels[-1] * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        if self.avg_pool:
            return x.mean(dim=(2, 3))
        return x.flatten(1)
