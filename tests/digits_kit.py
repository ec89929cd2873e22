"""The suite's digits set-up, from the shared kitchen (:mod:`modelsoup.demo.digits`).

Importable from tests and from cook configs (``digits_kit:model`` etc.). The tests'
numbers rest on this split and architecture: a shuffled split (1000 train, 400
held-out, 397 test) and a 64-48-10 MLP pretrained briefly on 300 images.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from modelsoup.demo.digits import (
    DigitsBNNet,
    DigitsKitchen,
    DigitsMLP,
    fine_tune,
    pretrain,
    sgd_train,
    write_fine_tunes,
)

KITCHEN = DigitsKitchen(
    split="shuffled",
    n_held_out=400,
    net=DigitsMLP,
    held_out_name="digits-held-out",
    test_name="digits-test",
)
GRID = [(0.01, 1), (0.03, 2), (0.1, 3), (0.3, 4), (0.05, 5)]
model = KITCHEN.model
held_out = KITCHEN.held_out
on_test = KITCHEN.test
bn_model = DigitsBNNet


def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    split = KITCHEN.data()
    return {
        "train": split.train.as_tuple(),
        "held_out": split.heldout.as_tuple(),
        "test": split.test.as_tuple(),
    }


def train_inputs() -> torch.Tensor:
    """Unlabeled training inputs, for BatchNorm recalibration."""
    return KITCHEN.data().train.x


def _train(model: torch.nn.Module, lr: float, epochs: int, seed: int) -> None:
    sgd_train(model, KITCHEN.train_data(), lr, epochs=epochs, seed=seed)


@lru_cache(maxsize=1)
def pretrained_state() -> dict[str, torch.Tensor]:
    return pretrain(DigitsMLP, KITCHEN.train_data(), n=300, lr=0.05, epochs=2)


def write_ingredients(folder: Path, grid=GRID) -> list[Path]:
    runs = [(f"ft-lr{lr}-s{seed}", lr, seed) for lr, seed in grid]
    data = KITCHEN.train_data()
    return write_fine_tunes(folder, runs, DigitsMLP, pretrained_state, data, epochs=3)


def independent(seed: int, net=DigitsBNNet, epochs: int = 4) -> dict[str, torch.Tensor]:
    """A network trained from its own random start (not a shared one)."""
    torch.manual_seed(1000 + seed)
    return fine_tune(
        net, net().state_dict(), KITCHEN.train_data(), lr=0.05, seed=seed, epochs=epochs
    )
