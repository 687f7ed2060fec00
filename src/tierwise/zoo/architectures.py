"""The default model zoo: three CNNs for Fashion-MNIST, each a sequence of named blocks.

A model is an `nn.Sequential` of blocks, so it can be cut at any block boundary: blocks
`[0, k)` on the device, the rest on a server. The first block takes the raw uint8 image and
normalises it itself, so every tier and every split head is fed the same bytes.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# Fashion-MNIST training-set pixel statistics, on the 0..1 scale.
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530
ARCHITECTURES = ("device", "edge", "cloud")


class Normalize(nn.Module):
    """uint8 pixels -> zero-mean, unit-variance float32."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(torch.float32) * (1.0 / 255.0) - PIXEL_MEAN) * (1.0 / PIXEL_STD)


def _conv(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _classifier(in_features: int, hidden: int | None, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    if hidden:
        layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_features = hidden
    elif dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_features, 10))
    return nn.Sequential(*layers)


def device_cnn() -> nn.Sequential:
    """~25k parameters: three 3x3 conv stages and global average pooling."""
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(Normalize(), *_conv(1, 16), nn.MaxPool2d(2)),      # 16x14x14
        stage2=nn.Sequential(*_conv(16, 32), nn.MaxPool2d(2)),              # 32x7x7
        stage3=nn.Sequential(*_conv(32, 64), nn.AdaptiveAvgPool2d(1)),      # 64x1x1
        head=_classifier(64, None, 0.0),
    ))


def edge_cnn() -> nn.Sequential:
    """~0.13M parameters: three conv stages and a small dense head."""
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(Normalize(), *_conv(1, 32), nn.MaxPool2d(2)),      # 32x14x14
        stage2=nn.Sequential(*_conv(32, 64), nn.MaxPool2d(2)),              # 64x7x7
        stage3=nn.Sequential(*_conv(64, 64), nn.MaxPool2d(2)),              # 64x3x3
        head=_classifier(64 * 3 * 3, 128, 0.3),
    ))


def cloud_cnn() -> nn.Sequential:
    """~0.6M parameters, VGG-style with a wide 7x7 stage: the most accurate of the three."""
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(Normalize(), *_conv(1, 32), nn.MaxPool2d(2)),      # 32x14x14
        stage2=nn.Sequential(*_conv(32, 64), nn.MaxPool2d(2)),              # 64x7x7
        stage3=nn.Sequential(*_conv(64, 128)),                              # 128x7x7
        stage4=nn.Sequential(*_conv(128, 128), nn.MaxPool2d(2)),            # 128x3x3
        head=_classifier(128 * 3 * 3, 256, 0.4),
    ))


_BUILDERS = {"device": device_cnn, "edge": edge_cnn, "cloud": cloud_cnn}


def build(architecture: str) -> nn.Sequential:
    if architecture not in _BUILDERS:
        raise ValueError(f"architecture: expected one of {ARCHITECTURES}, got {architecture!r}")
    return _BUILDERS[architecture]()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
