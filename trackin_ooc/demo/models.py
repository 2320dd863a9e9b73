"""Small models for 8×8 digit images (input shape (batch, 1, 8, 8))."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_features: int, hidden: Sequence[int] = (64,), *, seed: int = 0) -> nn.Module:
    """Flatten → Linear/ReLU stack → 10 logits."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def digits_mlp(hidden: Sequence[int] = (64,), *, seed: int = 0) -> nn.Module:
    """Flatten 8×8 digits → Linear/ReLU stack → 10 logits."""
    return mlp(64, hidden, seed=seed)


class DigitsCNN(nn.Module):
    """Conv2d(1→8, 3×3) → ReLU → Conv2d(8→8, 3×3) → ReLU → Linear(8·4·4 → 10)."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3)
        self.conv2 = nn.Conv2d(channels, channels, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def digits_cnn(channels: int = 8, *, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DigitsCNN(channels)


def mnist1d_mlp(hidden: Sequence[int] = (128, 128), *, seed: int = 0) -> nn.Module:
    """MNIST-1D (40 samples per signal) → Linear/ReLU stack → 10 logits; inputs (batch, 40) or (batch, 1, 40)."""
    return mlp(40, hidden, seed=seed)


class Mnist1dCNN(nn.Module):
    """Conv1d(1→c, 5, stride 2) → ReLU → Conv1d(c→c, 3, stride 2) → ReLU → Linear(c·8 → 10); inputs (batch, 1, 40)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def mnist1d_cnn(channels: int = 32, *, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Mnist1dCNN(channels)
