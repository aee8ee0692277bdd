"""The engine's implementation of :class:`fedmoe.algorithms.base.ServerContext`."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import Dataset

from fedmoe.algorithms.base import StateDict
from fedmoe.data.federated import FederatedDataModule
from fedmoe.federation.runner import LocalRunner, RunnerSettings


class EngineContext:
    """Server-side data and compute for algorithms: prediction, training, evaluation."""

    def __init__(self, module, datamodule: FederatedDataModule, settings: RunnerSettings, template: StateDict) -> None:
        self.module = module
        self.datamodule = datamodule
        splits = datamodule.splits
        self.probe: Dataset = splits.probe
        self.server_train: Dataset = splits.server_train
        self.val: Dataset = splits.val
        self.test: Dataset = splits.test
        self.num_classes = splits.num_classes
        self._template = template
        server_settings = replace(settings, limit_train_batches=None, max_steps=-1, gradient_clip_val=None)
        self.runner = LocalRunner(server_settings)
        self._network: nn.Module | None = None
        net = module.net
        self._adapted = list(net.adapted_layers()) if hasattr(net, "adapted_layers") else []
        self._trainable = {k for k, p in net.named_parameters() if p.requires_grad}

    def build_network(self, num_outputs: int | None = None) -> nn.Module:
        return self.module.build_network(num_outputs)

    def load_network(self, weights: StateDict) -> nn.Module:
        """One reused client-architecture network with ``weights`` loaded. It is built once without
        drawing from the global RNG, so evaluating (or not) never changes a run's random numbers."""
        if self._network is None:
            with torch.random.fork_rng(devices=[]):
                self._network = self.build_network()
        load_weights(self._network, weights)
        return self._network

    def adapted_layers(self) -> list:
        return self._adapted

    def trainable_keys(self) -> set[str]:
        return set(self._trainable)

    def client_template(self) -> StateDict:
        return self._template

    def predict(self, module: nn.Module, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return self.runner.predict(module, self.datamodule.eval_loader(dataset))

    def fit(self, module: nn.Module, dataset: Dataset, epochs: int, optimizer_state: dict | None = None) -> dict | None:
        loader = self.datamodule.train_loader(dataset, self.datamodule.server_batch_size)
        return self.runner.fit(module, loader, epochs=epochs, optimizer_state=optimizer_state).optimizer_state

    def evaluate(self, module: nn.Module, dataset: Dataset) -> dict[str, float]:
        return self.runner.evaluate(module, self.datamodule.eval_loader(dataset), self.datamodule.metrics)


def load_weights(net: nn.Module, weights: StateDict) -> None:
    """Load a full state dict strictly, or a subset of keys over the network's current values.

    Adapter rules send only what varies (adapters, head, corrected base weights); the frozen rest
    of the network is the same everywhere and never travels.
    """
    if len(weights) == len(net.state_dict()):
        net.load_state_dict(weights)
        return
    unexpected = net.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise KeyError(f"weights have keys the network does not: {sorted(unexpected)[:3]}")
