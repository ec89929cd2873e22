"""Real small ingredients for tests: an MLP on scikit-learn's digits, fine-tuned from one start.

Importable from tests and from cook configs (``digits_kit:model`` etc.).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import safetensors.torch
import torch
from sklearn.datasets import load_digits
from torch import nn

from modelsoup.evaluators import Accuracy


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 48):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@lru_cache(maxsize=1)
def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return {
        "train": (x[:1000], y[:1000]),
        "held_out": (x[1000:1400], y[1000:1400]),
        "test": (x[1400:], y[1400:]),
    }


def _train(model: nn.Module, lr: float, epochs: int, seed: int, n: int = 1000) -> None:
    x, y = splits()["train"]
    x, y = x[:n], y[:n]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), 50):
            idx = perm[s : s + 50]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


@lru_cache(maxsize=1)
def pretrained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = DigitsMLP()
    _train(model, lr=0.05, epochs=2, seed=0, n=300)  # the shared start: a weak model
    return {k: v.clone() for k, v in model.state_dict().items()}


def fine_tune(lr: float, seed: int, epochs: int = 3) -> dict[str, torch.Tensor]:
    model = DigitsMLP()
    model.load_state_dict(pretrained_state())
    _train(model, lr=lr, epochs=epochs, seed=seed)
    return model.state_dict()


GRID = [(0.01, 1), (0.03, 2), (0.1, 3), (0.3, 4), (0.05, 5)]


def write_ingredients(folder: Path, grid=GRID) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for lr, seed in grid:
        path = folder / f"ft-lr{lr}-s{seed}.safetensors"
        if not path.exists():
            safetensors.torch.save_file(fine_tune(lr, seed), str(path))
            path.with_suffix(".json").write_text(
                f'{{"hyperparameters": {{"lr": {lr}, "seed": {seed}}}}}'
            )
        paths.append(path)
    return paths


def model() -> nn.Module:
    return DigitsMLP()


def held_out() -> Accuracy:
    return Accuracy(splits()["held_out"], name="digits-held-out")


def on_test() -> Accuracy:
    return Accuracy(splits()["test"], name="digits-test")


class DigitsBNNet(nn.Module):
    """An MLP with BatchNorm: soups of these need fresh statistics."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.fc1(x)))
        return self.head(torch.relu(self.bn2(self.fc2(x))))


def bn_model() -> nn.Module:
    return DigitsBNNet()


def train_inputs() -> torch.Tensor:
    """Unlabeled training inputs, for BatchNorm recalibration."""
    return splits()["train"][0]


def independent(seed: int, net=DigitsBNNet, epochs: int = 4) -> dict[str, torch.Tensor]:
    """A network trained from its own random start (not a shared one)."""
    torch.manual_seed(1000 + seed)
    model = net()
    _train(model, lr=0.05, epochs=epochs, seed=seed)
    return model.state_dict()
