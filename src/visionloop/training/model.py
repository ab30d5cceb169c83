"""A small residual CNN whose width and depth are settings, sized from the data when left at 0.

The model takes float pixels in [0, 1] (N, C, H, W) and normalises them itself with the training
split's mean and std, stored as buffers: the exported ONNX graph then needs nothing but pixels, and
serving cannot get the normalisation wrong. A third buffer, the softmax temperature, carries the
post-hoc calibration into the exported graph the same way. ``forward_features`` returns the penultimate-layer
embedding (global average pool), which the export exposes as a second output for drift monitoring.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    in_channels: int
    num_classes: int
    image_size: int
    width: int
    depth: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})

    @property
    def embedding_dim(self) -> int:
        return stage_widths(self.width, self.depth)[-1]


def stage_widths(width: int, depth: int) -> list[int]:
    return [min(width * 2**i, 512) for i in range(depth)]


def auto_size(image_size: int, num_train: int, width: int = 0, depth: int = 0) -> tuple[int, int]:
    """Depth: one stage per halving from ``image_size`` down to 4 pixels (16 -> 3, 32 -> 4, 64 -> 5).
    Width: 16 channels for a few hundred images, 32 for more — enough capacity, little overfitting."""
    if depth == 0:
        depth = max(2, min(5, int(math.log2(max(image_size, 8))) - 1))
    if width == 0:
        width = 16 if num_train < 1000 else 32
    return width, depth


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResidualCNN(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        widths = stage_widths(spec.width, spec.depth)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))
        # post-hoc calibration: logits are divided by this before softmax (1 while training; fitted
        # on the validation split afterwards, see train.fit_temperature)
        self.register_buffer("temperature", torch.ones(()))
        self.stem = nn.Sequential(
            nn.Conv2d(spec.in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, c_in = [], widths[0]
        for i, c_out in enumerate(widths):
            blocks.append(ResidualBlock(c_in, c_out, stride=1 if i == 0 else 2))
            c_in = c_out
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, spec.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities from this model's logits."""
        return torch.softmax(logits.float() / self.temperature, dim=1)


class ExportWrapper(nn.Module):
    """What the ONNX graph computes: class probabilities and the embedding, from [0, 1] pixels."""

    def __init__(self, model: ResidualCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.model.forward_features(x)
        return self.model.probabilities(self.model.head(embedding)), embedding


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(spec: ModelSpec) -> int:
    """Forward multiply-adds x2 of the convolutions and the head (for model FLOP utilisation)."""
    widths = stage_widths(spec.width, spec.depth)
    side = spec.image_size
    flops = 2 * 9 * spec.in_channels * widths[0] * side * side  # stem
    c_in = widths[0]
    for i, c_out in enumerate(widths):
        if i > 0:
            side = (side + 1) // 2
        flops += 2 * 9 * c_in * c_out * side * side + 2 * 9 * c_out * c_out * side * side
        if i > 0 or c_in != c_out:
            flops += 2 * c_in * c_out * side * side
        c_in = c_out
    return flops + 2 * c_in * spec.num_classes
