"""A small CIFAR-style ResNet with BatchNorm for 28x28 grayscale images (Fashion-MNIST).

ResNet-(6n+2) of He et al. 2016, section 4.2: a 3x3 stem, three stages of ``n`` basic
blocks with 16k, 32k and 64k channels (``k`` is the width multiplier of Git Re-Basin's
"ResNet-20 x k"), global average pooling and a linear head. The stem has stride 2 by
default (28 -> 14 pixels) so the x4 network trains in minutes on a CPU. Written with
plain modules and ``torch.relu`` so ``torch.fx`` can trace it for permutation alignment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from modelsoup.demo.training import train_ingredient


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (1x1 conv-BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-(6n+2) with width multiplier ``width``; ``model(x)`` gives logits.

    Example:
        >>> import torch
        >>> ResNet(blocks=1, width=1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, blocks: int = 1, width: int = 4, num_classes: int = 10, stem_stride: int = 2
    ) -> None:
        super().__init__()
        c = 16 * width
        self.stem = nn.Conv2d(1, c, 3, stem_stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        layers: list[nn.Module] = []
        c_in = c
        for stage, c_out in enumerate((c, 2 * c, 4 * c)):
            for b in range(blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layers(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


def train_from_scratch(
    factory: Callable[[], nn.Module],
    train: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    seed: int,
    start_state: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One network from its own init and batch order (both from ``seed``), or from
    ``start_state`` with its own batch order: SGD momentum 0.9, batch 128, cosine schedule
    with 5% warm-up, no gradient clipping."""
    return train_ingredient(
        factory,
        train,
        lr=lr,
        weight_decay=weight_decay,
        epochs=epochs,
        batch_size=128,
        seed=seed,
        optimizer="sgd",
        momentum=0.9,
        schedule="cosine",
        warmup_frac=0.05,
        max_grad_norm=None,
        start_state=start_state,
    )
