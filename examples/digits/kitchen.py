"""Everything a cook config needs, for scikit-learn's 8x8 digits, and a script that
fine-tunes a folder of ingredients to soup.

Run from this folder (seconds on one CPU core, offline):

    python kitchen.py               # fine-tune 6 ingredients into runs/
    modelsoup inspect runs/         # what is there, and can it be averaged?
    modelsoup diagnose soup.yaml    # one basin, or several?
    modelsoup cook soup.yaml        # soups, report.md and figures in cooked/

``soup.yaml`` names the functions below as ``kitchen.py:model``, ``kitchen.py:held_out``
and ``kitchen.py:test``: swap in your own architecture and data the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from modelsoup.demo.digits import DigitsKitchen
from modelsoup.demo.training import train_grid
from modelsoup.evaluators import Accuracy

HERE = Path(__file__).resolve().parent
#: one fixed split, stratified under seed 0: train (1000 images, fine-tuning), held-out
#: (300, chooses the soup), test (497, judges it); and a 64-128-10 MLP
KITCHEN = DigitsKitchen()


def model() -> torch.nn.Module:
    """The architecture every ingredient shares (weights are loaded into it).

    Example:
        >>> model()(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """
    return KITCHEN.model()


def held_out() -> Accuracy:
    """Accuracy on the 300 held-out digits: the recipes choose with it.

    Example:
        >>> held_out().name.startswith("held-out")
        True
    """
    return KITCHEN.held_out()


def test() -> Accuracy:
    """Accuracy on the 497 test digits: reported, never used to choose.

    Example:
        >>> test().name.startswith("test")
        True
    """
    return KITCHEN.test()


def main(out: Path = HERE / "runs") -> list[Path]:
    """Fine-tune a grid of ingredients from one shared start; return their paths.

    Every ingredient starts from the same weights: here a random init built under seed 0;
    with a pretrained model, pass its state dict as ``start_state=`` instead. Each one then
    trains with its own learning rate and seed and is saved as ``out/<name>.safetensors``
    with a JSON sidecar of its hyperparameters; a re-run skips what is already there.

    Example:
        >>> import tempfile
        >>> paths = main(Path(tempfile.mkdtemp()))
        >>> [p.name for p in paths][:2]
        ['lr0.003_seed0.safetensors', 'lr0.003_seed1.safetensors']
    """
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they save
    return train_grid(
        model,
        KITCHEN.train_data(),
        {"lr": [3e-3, 1e-2, 3e-2]},
        out,
        start_seed=0,
        seeds=[0, 1],
        epochs=4,
        batch_size=32,
        warmup_frac=0.1,
        progress=False,
    )


if __name__ == "__main__":
    paths = main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs")
    print(f"{len(paths)} ingredients in {paths[0].parent}")
