"""Shared fixtures: small real networks and real checkpoints written in tmp_path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# The networks in the suite are tiny: thread start-up costs more than it saves, and a
# busy second core makes multi-threaded tiny ops crawl.
torch.set_num_threads(1)


class TinyNet(nn.Module):
    """A small MLP with a BatchNorm layer, so checkpoints carry integer buffers."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def tiny_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
    sd = net.state_dict()
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def tiny_files(tmp_path, count: int = 3) -> tuple[list[str], str]:
    """``count`` tiny fine-tunes and a base (seed 10) as safetensors files in ``tmp_path``."""
    import safetensors.torch

    paths = []
    for s in range(count):
        path = tmp_path / f"ft{s}.safetensors"
        safetensors.torch.save_file(tiny_state(s), str(path))
        paths.append(str(path))
    base = tmp_path / "base.safetensors"
    safetensors.torch.save_file(tiny_state(10), str(base))
    return paths, str(base)


@pytest.fixture
def states():
    return [tiny_state(s) for s in range(3)]


@pytest.fixture(scope="session")
def digits_ckpts(tmp_path_factory):
    """Five digits MLPs fine-tuned from one start, as safetensors with hyperparameter sidecars."""
    from digits_kit import write_ingredients

    folder = tmp_path_factory.mktemp("digits")
    write_ingredients(folder)
    return folder
