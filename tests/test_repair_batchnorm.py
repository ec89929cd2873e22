"""BatchNorm recalibration on a small network trained on sklearn's digits."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelsoup.errors import ConfigError
from modelsoup.repair import has_batchnorm, recalibrate_bn


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)  # raw 0..16 pixels: far from zero mean, unit var
    y = torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=gen)
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def make_net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def trained(digits) -> dict[str, torch.Tensor]:
    """State dict of a net trained for a few epochs (about a second on CPU)."""
    x, y, _, _ = digits
    torch.manual_seed(0)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.state_dict()


def fresh(state: dict[str, torch.Tensor]) -> nn.Module:
    net = make_net()
    net.load_state_dict(state)
    return net.eval()


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def corrupt(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.zero_()
            m.running_var.fill_(1.0)


def test_recalibrating_a_trained_net_keeps_its_accuracy(digits, trained):
    x, _, x_test, y_test = digits
    net = fresh(trained)
    before = accuracy(net, x_test, y_test)
    assert before > 0.9
    recalibrate_bn(net, DataLoader(TensorDataset(x), batch_size=128))
    assert abs(accuracy(net, x_test, y_test) - before) <= 0.02


def test_recalibration_repairs_corrupted_statistics(digits, trained):
    x, y, x_test, y_test = digits
    net = fresh(trained)
    before = accuracy(net, x_test, y_test)
    corrupt(net)
    broken = accuracy(net, x_test, y_test)
    assert broken < before - 0.1  # about 0.96 -> 0.73 here
    recalibrate_bn(net, DataLoader(TensorDataset(x, y), batch_size=128))  # (inputs, labels)
    assert accuracy(net, x_test, y_test) >= before - 0.02


def test_statistics_equal_the_exact_mean_over_the_data(digits, trained):
    # With momentum=None the running mean is the plain average of batch means.
    x = digits[0][:512]
    net = fresh(trained)
    recalibrate_bn(net, x.split(128))
    with torch.no_grad():
        expected = net[0](x).mean(0)
    assert torch.allclose(net[1].running_mean, expected, atol=1e-5)
    assert int(net[1].num_batches_tracked) == 4


def test_flags_and_momentum_are_restored(digits, trained):
    net = fresh(trained)
    net[1].momentum = 0.3
    net[3].train()  # a dropout left in train mode stays in train mode
    recalibrate_bn(net, digits[0], num_batches=1)
    assert not net.training and not net[1].training and net[3].training
    assert net[1].momentum == 0.3 and net[5].momentum == 0.1
    assert int(net[1].num_batches_tracked) == 1


def test_accepts_tensors_dicts_and_generators(digits, trained):
    x = digits[0][:300]
    by_tensor = fresh(trained)
    recalibrate_bn(by_tensor, x)  # split into two batches of 150 (at most 256 rows each)
    assert int(by_tensor[1].num_batches_tracked) == 2

    class KeywordNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = fresh(trained)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.body(pixels)

    by_dict = KeywordNet()
    recalibrate_bn(by_dict, ({"pixels": b} for b in x.split(150)), device="cpu")
    assert torch.allclose(by_dict.body[1].running_mean, by_tensor[1].running_mean)


def test_empty_data_raises_and_keeps_old_statistics(trained):
    net = fresh(trained)
    with pytest.raises(ConfigError, match="no batches"):
        recalibrate_bn(net, [])
    assert torch.equal(net[1].running_mean, trained["1.running_mean"])
    assert int(net[1].num_batches_tracked) == int(trained["1.num_batches_tracked"])


def test_has_batchnorm_and_no_op_without_it():
    assert has_batchnorm(make_net())
    mlp = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    assert not has_batchnorm(mlp)
    assert recalibrate_bn(mlp, []) is mlp


def test_a_loaders_recalibration_tag_names_its_data_and_batching_not_its_shuffle():
    from modelsoup.repair.batchnorm import as_recalibration, recalibration_tag

    data = torch.utils.data.TensorDataset(torch.randn(32, 3))
    shuffled = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    tags = {recalibration_tag(as_recalibration(shuffled)) for _ in range(3)}
    assert len(tags) == 1  # the same data, whatever order a run draws
    other = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    assert recalibration_tag(as_recalibration(other)) not in tags  # other batch statistics

    def mine(module):  # a function of yours: named by its code, and left as it is
        return module

    assert recalibration_tag(as_recalibration(mine)).startswith("recalibrated by ")
    assert not hasattr(mine, "tag")
