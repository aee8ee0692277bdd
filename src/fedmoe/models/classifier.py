"""The client LightningModule: a network, cross-entropy, and the optimizer from the config."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.models.networks import build_network

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


def _default_optimizer(params: Iterable) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class Classifier(L.LightningModule):
    """A classifier whose ``net`` is what travels between clients and server.

    Args:
        network: a registered architecture (``femnist_cnn``, ``cifar_resnet18``, ``digits_cnn``) or a
            dotted path to an ``nn.Module`` class whose first argument is ``num_classes``.
        num_classes: size of the output layer.
        network_kwargs: extra keyword arguments of the architecture.
        optimizer: the local optimizer, e.g. ``{class_path: torch.optim.Adam, init_args: {lr: 3e-4}}``.
        label_smoothing: cross-entropy label smoothing of local training.
    """

    def __init__(
        self,
        network: str = "digits_cnn",
        num_classes: int = 10,
        network_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerFactory = _default_optimizer,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.network = network
        self.num_classes = num_classes
        self.network_kwargs = dict(network_kwargs or {})
        self.optimizer_factory = optimizer
        self.label_smoothing = label_smoothing
        self.net = self.build_network()

    def build_network(self, num_outputs: int | None = None) -> nn.Module:
        """A fresh network of this architecture with a ``num_outputs``-way head."""
        n = self.num_classes if num_outputs is None else num_outputs
        return build_network(self.network, n, **self.network_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, label_smoothing=self.label_smoothing)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())
