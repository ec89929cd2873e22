"""Shared fixtures: small real networks and real checkpoints written in tmp_path."""

from __future__ import annotations

import pytest
import torch
from torch import nn


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


@pytest.fixture
def states():
    return [tiny_state(s) for s in range(3)]
