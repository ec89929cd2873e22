"""The digits kitchen: scikit-learn's 8x8 digits, small MLPs, one shared start, fine-tunes.

One home for everything a digits cook needs, used by ``examples/digits/kitchen.py``,
the demo's quick variant, the test suite (``tests/digits_kit.py``) and the recipes
benchmark. A :class:`DigitsKitchen` fixes the split and the architecture; the
fine-tuning helpers (:func:`sgd_train`, :func:`pretrain`, :func:`fine_tune`,
:func:`write_fine_tunes`) are a plain SGD loop for seconds-long runs
(:func:`~modelsoup.demo.training.train_grid` is the full one).

Two ways to split the 1,797 images:

* ``"stratified"`` (the default): :func:`~modelsoup.demo.datasets.load_digits_split`,
  every class in proportion in each part;
* ``"shuffled"``: one seeded permutation cut into consecutive train, held-out and
  test blocks (the tests' and the benchmark's split).

Example:
    >>> kitchen = DigitsKitchen()
    >>> kitchen.held_out().name, len(kitchen.data().test)
    ('held-out digits', 497)
    >>> kitchen.model()(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from torch import nn

from modelsoup._util import atomic_file
from modelsoup.demo.datasets import DataSplit, Subset, load_digits_split
from modelsoup.demo.models import digits_mlp
from modelsoup.errors import ConfigError
from modelsoup.evaluators import Accuracy

__all__ = [
    "DigitsBNNet",
    "DigitsKitchen",
    "DigitsMLP",
    "digits_split",
    "fine_tune",
    "pretrain",
    "sgd_train",
    "write_fine_tunes",
]

#: images in scikit-learn's digits
_IMAGES = 1797
StateDict = dict[str, torch.Tensor]
Data = tuple[torch.Tensor, torch.Tensor]


class DigitsMLP(nn.Module):
    """A ReLU MLP 64 -> ``hidden`` -> 10 whose layers are named ``fc1`` ... ``fcN``.

    Example:
        >>> sorted(DigitsMLP(hidden=(32, 16)).state_dict())[:2]
        ['fc1.bias', 'fc1.weight']
    """

    def __init__(self, hidden: int | Sequence[int] = 48):
        super().__init__()
        widths = [64, *([hidden] if isinstance(hidden, int) else hidden), 10]
        self.depth = len(widths) - 1
        for k in range(self.depth):
            setattr(self, f"fc{k + 1}", nn.Linear(widths[k], widths[k + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(1, self.depth):
            x = torch.relu(getattr(self, f"fc{k}")(x))
        return getattr(self, f"fc{self.depth}")(x)


class DigitsBNNet(nn.Module):
    """An MLP with BatchNorm: soups of these need fresh statistics.

    Example:
        >>> DigitsBNNet().eval()(torch.zeros(3, 64)).shape
        torch.Size([3, 10])
    """

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        return self.head(torch.relu(self.bn2(self.fc2(x))))


@functools.cache
def digits_split(
    kind: Literal["stratified", "shuffled"] = "stratified",
    seed: int = 0,
    train: int = 1000,
    heldout: int = 300,
    test: int | None = None,
) -> DataSplit:
    """The digits split into train, held-out and test (``test=None``: all the rest).

    Computed once per argument set; x is float32 ``(N, 64)`` in [0, 1].

    Example:
        >>> split = digits_split("shuffled", train=1000, heldout=400)
        >>> len(split.train), len(split.heldout), len(split.test)
        (1000, 400, 397)
    """
    if kind == "stratified":
        rest = _IMAGES - train - heldout if test is None else test
        return load_digits_split(seed, train=train, heldout=heldout, test=rest)
    if kind != "shuffled":
        raise ConfigError(f"digits split '{kind}' is unknown; use 'stratified' or 'shuffled'")
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = train + heldout
    end = len(y) if test is None else cut + test
    parts = (slice(0, train), slice(train, cut), slice(cut, end))
    return DataSplit(*(Subset(x[p], y[p]) for p in parts), tuple(str(c) for c in range(10)))


def sgd_train(
    model: nn.Module,
    data: Data,
    lr: float,
    *,
    epochs: int,
    seed: int,
    momentum: float = 0.9,
    batch_size: int = 50,
) -> None:
    """Train ``model`` in place: plain SGD on cross-entropy, batches in a seeded order.

    Example:
        >>> model = DigitsMLP()
        >>> sgd_train(model, digits_split().train.as_tuple(), 0.05, epochs=1, seed=0)
    """
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch_size):
            idx = perm[s : s + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def pretrain(
    factory: Callable[[], nn.Module],
    data: Data,
    *,
    n: int,
    lr: float,
    epochs: int,
    momentum: float = 0.9,
) -> StateDict:
    """The shared start: a network built under seed 0, trained briefly on the first ``n``
    examples (a weak but useful start, as a pretrained network is downstream).

    Example:
        >>> start = pretrain(DigitsMLP, digits_split().train.as_tuple(), n=100, lr=0.05, epochs=1)
        >>> sorted(start)[:1]
        ['fc1.bias']
    """
    torch.manual_seed(0)
    model = factory()
    x, y = data
    sgd_train(model, (x[:n], y[:n]), lr, epochs=epochs, seed=0, momentum=momentum)
    return {k: v.clone() for k, v in model.state_dict().items()}


def fine_tune(
    factory: Callable[[], nn.Module],
    start: StateDict,
    data: Data,
    *,
    lr: float,
    seed: int,
    epochs: int,
    momentum: float = 0.9,
) -> StateDict:
    """One ingredient: ``start`` trained further with its own learning rate and seed.

    Example:
        >>> data = digits_split().train.as_tuple()
        >>> start = DigitsMLP().state_dict()
        >>> a = fine_tune(DigitsMLP, start, data, lr=0.1, seed=1, epochs=1)
        >>> b = fine_tune(DigitsMLP, start, data, lr=0.1, seed=1, epochs=1)
        >>> torch.equal(a["fc1.weight"], b["fc1.weight"])
        True
    """
    model = factory()
    model.load_state_dict(start)
    sgd_train(model, data, lr, epochs=epochs, seed=seed, momentum=momentum)
    return model.state_dict()


def write_fine_tunes(
    folder: Path,
    runs: Sequence[tuple[str, float, int]],
    factory: Callable[[], nn.Module],
    start: Callable[[], StateDict],
    data: Data,
    *,
    epochs: int,
    momentum: float = 0.9,
) -> list[Path]:
    """Fine-tune one ingredient per ``(name, lr, seed)`` into ``folder/<name>.safetensors``,
    with a JSON sidecar of its hyperparameters; files already there are kept.

    ``start`` is called only when something has to be trained.

    Example:
        >>> import tempfile
        >>> data = digits_split().train.as_tuple()
        >>> runs = [("a", 0.05, 1), ("b", 0.1, 2)]
        >>> paths = write_fine_tunes(
        ...     Path(tempfile.mkdtemp()), runs, DigitsMLP, DigitsMLP().state_dict, data, epochs=1
        ... )
        >>> [p.name for p in paths], json.loads(paths[0].with_suffix(".json").read_text())
        (['a.safetensors', 'b.safetensors'], {'hyperparameters': {'lr': 0.05, 'seed': 1}})
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, lr, seed in runs:
        path = folder / f"{name}.safetensors"
        if not path.exists():
            state = fine_tune(
                factory, start(), data, lr=lr, seed=seed, epochs=epochs, momentum=momentum
            )
            with atomic_file(path) as tmp:
                safetensors.torch.save_file(state, str(tmp))
            with atomic_file(path.with_suffix(".json")) as tmp:
                tmp.write_text(json.dumps({"hyperparameters": {"lr": lr, "seed": seed}}))
        paths.append(path)
    return paths


@dataclass(frozen=True)
class DigitsKitchen:
    """One digits set-up: the split, the architecture, and the evaluators' names.

    The defaults are the example's (``examples/digits``): a stratified split of 1000
    train, 300 held-out and 497 test images, and a 64-128-10 MLP.

    Example:
        >>> tests = DigitsKitchen(split="shuffled", n_held_out=400, net=DigitsMLP)
        >>> len(tests.data().heldout), sorted(tests.model().state_dict())[0]
        (400, 'fc1.bias')
    """

    split: Literal["stratified", "shuffled"] = "stratified"
    split_seed: int = 0
    n_train: int = 1000
    n_held_out: int = 300
    #: test images (None: all the rest)
    n_test: int | None = None
    #: the architecture every ingredient shares
    net: Callable[[], nn.Module] = digits_mlp
    held_out_name: str = "held-out digits"
    test_name: str = "test digits"

    def data(self) -> DataSplit:
        """The split (computed once).

        Example:
            >>> len(DigitsKitchen().data().train)
            1000
        """
        return digits_split(self.split, self.split_seed, self.n_train, self.n_held_out, self.n_test)

    def model(self) -> nn.Module:
        """A fresh network of the shared architecture.

        Example:
            >>> DigitsKitchen().model()(torch.zeros(1, 64)).shape
            torch.Size([1, 10])
        """
        return self.net()

    def train_data(self) -> Data:
        """The training images and labels (fine-tuning only: never chooses nor judges).

        Example:
            >>> DigitsKitchen().train_data()[0].shape
            torch.Size([1000, 64])
        """
        return self.data().train.as_tuple()

    def held_out(self, **options: Any) -> Accuracy:
        """Accuracy on the held-out images: the recipes choose with it.

        Example:
            >>> DigitsKitchen().held_out(batch_size=64).batch_size
            64
        """
        return Accuracy(self.data().heldout.as_tuple(), name=self.held_out_name, **options)

    def test(self, **options: Any) -> Accuracy:
        """Accuracy on the test images: reported, never used to choose.

        Example:
            >>> DigitsKitchen().test().name
            'test digits'
        """
        return Accuracy(self.data().test.as_tuple(), name=self.test_name, **options)
