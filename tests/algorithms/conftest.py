"""Shared pieces of the algorithm tests: a tiny registered network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmoe.models.networks import NETWORKS, register_network

TINY_NETWORK = "test_tiny_mlp"
IN_FEATURES = 8


class TinyMLP(nn.Module):
    """Linear(8, 6) -> BatchNorm1d -> ReLU -> Linear(6, num_classes): float parameters plus an
    int64 ``num_batches_tracked`` buffer, small enough to check every number by hand."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


# Guarded: registering the same name twice with another class object is an error.
if TINY_NETWORK not in NETWORKS:
    register_network(TINY_NETWORK)(TinyMLP)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: one intra-op thread is faster than spinning up a pool on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
