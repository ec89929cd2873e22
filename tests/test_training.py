"""Real, small training runs: a digits MLP over a 2x2 grid, cache, reproducibility."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from modelsoup.demo.datasets import load_digits_split
from modelsoup.demo.models import digits_mlp
from modelsoup.demo.training import ingredient_name, train_grid, train_ingredient
from modelsoup.errors import ConfigError

GRID = {"lr": [3e-3, 1e-2], "weight_decay": [0.0, 0.1]}


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


def accuracy(state: dict[str, torch.Tensor], subset) -> float:
    model = digits_mlp()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return (model(subset.x).argmax(1) == subset.y).float().mean().item()


def test_grid_writes_one_file_pair_per_point(digits, tmp_path):
    paths = train_grid(
        digits_mlp, digits.train.as_tuple(), GRID, tmp_path, epochs=2, progress=False
    )
    assert [p.name for p in paths] == [
        "lr0.003_wd0.safetensors",
        "lr0.003_wd0.1.safetensors",
        "lr0.01_wd0.safetensors",
        "lr0.01_wd0.1.safetensors",
    ]
    for path in paths:
        meta = json.loads(path.with_suffix(".json").read_text())
        hp = meta["hyperparameters"]
        assert (hp["epochs"], hp["seed"], hp["optimizer"]) == (2, 0, "adamw")
        assert path.stem == ingredient_name(hp, ["lr", "weight_decay"])
        state = load_file(path)
        assert set(state) == set(digits_mlp().state_dict())
        # Ten classes: chance is 10%; two epochs of AdamW reach far more.
        assert accuracy(state, digits.heldout) > 0.5
    assert not list(tmp_path.glob("*.tmp")), "temp files must be renamed or removed"


def test_rerun_skips_trained_points_and_retrains_changed_ones(digits, tmp_path):
    data = digits.train.as_tuple()
    first = train_grid(digits_mlp, data, GRID, tmp_path, epochs=1, progress=False)
    stamps = {p: os.stat(p).st_mtime_ns for p in first}
    again = train_grid(digits_mlp, data, GRID, tmp_path, epochs=1, progress=False)
    assert again == first
    assert {p: os.stat(p).st_mtime_ns for p in again} == stamps
    # Another fixed hyperparameter is another experiment: everything is retrained.
    train_grid(digits_mlp, data, GRID, tmp_path, epochs=1, batch_size=64, progress=False)
    assert all(os.stat(p).st_mtime_ns != stamps[p] for p in first)
    meta = json.loads(first[0].with_suffix(".json").read_text())
    assert meta["hyperparameters"]["batch_size"] == 64


def test_rerun_with_other_start_weights_retrains(digits, tmp_path):
    data = digits.train.as_tuple()
    grid = {"lr": [1e-2]}
    (path,) = train_grid(digits_mlp, data, grid, tmp_path, progress=False)
    stamp = os.stat(path).st_mtime_ns
    train_grid(digits_mlp, data, grid, tmp_path, start_seed=1, progress=False)
    assert os.stat(path).st_mtime_ns != stamp


def test_grid_points_share_the_start(digits, tmp_path):
    """Every ingredient starts from start_state, even with several seeds."""
    torch.manual_seed(123)
    start = digits_mlp().state_dict()
    data = digits.train.as_tuple()
    paths = train_grid(
        digits_mlp, data, {"lr": [1e-2]}, tmp_path, start_state=start, seeds=[0, 1], progress=False
    )
    assert [p.stem for p in paths] == ["lr0.01_seed0", "lr0.01_seed1"]
    direct = train_ingredient(digits_mlp, data, lr=1e-2, seed=1, start_state=start)
    saved = load_file(paths[1])
    assert all(torch.equal(saved[k], direct[k]) for k in direct)


def test_same_seed_same_weights_other_lr_other_weights(digits):
    data = digits.train.as_tuple()
    a = train_ingredient(digits_mlp, data, lr=1e-2, seed=7)
    b = train_ingredient(digits_mlp, data, lr=1e-2, seed=7)
    c = train_ingredient(digits_mlp, data, lr=3e-3, seed=7)
    d = train_ingredient(digits_mlp, data, lr=1e-2, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], d[k]) for k in a)


def test_train_ingredient_leaves_global_rng_alone(digits):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    train_ingredient(digits_mlp, digits.train.as_tuple(), lr=1e-2, seed=0, epochs=1)
    assert torch.equal(torch.rand(3), expected)


def test_sgd_and_dict_inputs(digits):
    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = digits_mlp()

        def forward(self, pixels):
            return self.net(pixels)

    data = ({"pixels": digits.train.x}, digits.train.y)
    state = train_ingredient(
        DictModel, data, lr=0.1, optimizer="sgd", epochs=2, schedule="cosine", label_smoothing=0.1
    )
    model = DictModel()
    model.load_state_dict(state)
    with torch.no_grad():
        acc = (model(digits.heldout.x).argmax(1) == digits.heldout.y).float().mean().item()
    assert acc > 0.5


def test_fused_adamw_is_adamw_rounded_differently_and_reproducible(digits):
    data = digits.train.as_tuple()
    plain = train_ingredient(digits_mlp, data, lr=1e-2, epochs=2, seed=1)
    fused = train_ingredient(digits_mlp, data, lr=1e-2, epochs=2, seed=1, optimizer="adamw_fused")
    again = train_ingredient(digits_mlp, data, lr=1e-2, epochs=2, seed=1, optimizer="adamw_fused")
    torch.manual_seed(1)  # train_ingredient seeds the model's construction with its seed
    start = digits_mlp()
    for k in plain:
        assert torch.equal(fused[k], again[k])
        moved = (plain[k] - start.state_dict()[k]).norm()
        assert moved > 0
        # the same update: the two runs differ by rounding only, far less than training moved
        assert (fused[k] - plain[k]).norm() < 1e-3 * moved


def test_frozen_parameters_stay_at_start(digits):
    def half_frozen():
        model = digits_mlp()
        model[0].requires_grad_(False)
        return model

    torch.manual_seed(0)
    start = half_frozen().state_dict()
    state = train_ingredient(half_frozen, digits.train.as_tuple(), lr=1e-2, start_state=start)
    assert torch.equal(state["0.weight"], start["0.weight"])
    assert not torch.equal(state["2.weight"], start["2.weight"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr=-1.0"),
        ({"lr": 1e-2, "optimizer": "adam"}, "optimizer='adam'"),
        ({"lr": 1e-2, "schedule": "step"}, "schedule='step'"),
        ({"lr": 1e-2, "epochs": 0}, "epochs=0"),
    ],
)
def test_bad_settings_raise_config_error(digits, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        train_ingredient(digits_mlp, digits.train.as_tuple(), **kwargs)


def test_bad_grid_raises_config_error(digits, tmp_path):
    data = digits.train.as_tuple()
    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        train_grid(digits_mlp, data, {"learning_rate": [1e-3]}, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="non-empty list"):
        train_grid(digits_mlp, data, {"lr": []}, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="texts first"):
        train_ingredient(digits_mlp, (["a", "b"], torch.tensor([0, 1])), lr=1e-3)
