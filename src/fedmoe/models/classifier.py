"""The client LightningModule: a network, its loss (cross-entropy, or MSE for a one-output
regression head), and the optimizer from the config."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.errors import FedMoEError
from fedmoe.models.networks import build_network

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


def _default_optimizer(params: Iterable) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


class Classifier(L.LightningModule):
    """A classifier whose ``net`` is what travels between clients and server.

    Args:
        network: a registered architecture (``femnist_cnn``, ``cifar_resnet18``, ``digits_cnn``) or a
            dotted path to an ``nn.Module`` class whose first argument is ``num_classes``.
        num_classes: size of the output layer; 1 is regression (STS-B): MSE on the single output.
        network_kwargs: extra keyword arguments of the architecture.
        optimizer: the local optimizer, e.g. ``{class_path: torch.optim.Adam, init_args: {lr: 3e-4}}``.
        label_smoothing: cross-entropy label smoothing of local training.
        lr_schedule: ``constant``, or ``linear``: a warm-up over the first ``warmup_ratio`` of each
            local fit's optimizer steps, then linear decay to 0 (the FedEx-LoRA recipe, rebuilt
            every round as the optimizer is).
        warmup_ratio: share of a local fit's steps spent warming up (``linear`` only).
    """

    def __init__(
        self,
        network: str = "digits_cnn",
        num_classes: int = 10,
        network_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerFactory = _default_optimizer,
        label_smoothing: float = 0.0,
        lr_schedule: Literal["constant", "linear"] = "constant",
        warmup_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        self.network = network
        self.num_classes = num_classes
        self.network_kwargs = dict(network_kwargs or {})
        self.optimizer_factory = optimizer
        self.label_smoothing = label_smoothing
        if not 0.0 <= warmup_ratio < 1.0:
            raise FedMoEError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.lr_schedule = lr_schedule
        self.warmup_ratio = warmup_ratio
        self.planned_steps: int | None = None
        """Optimizer steps of the coming local fit, set by the runner before configure_optimizers."""
        self.net = self.build_network()

    def build_network(self, num_outputs: int | None = None) -> nn.Module:
        """A fresh network of this architecture with a ``num_outputs``-way head."""
        n = self.num_classes if num_outputs is None else num_outputs
        return build_network(self.network, n, **self.network_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss(self.net(x), y)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over classes, or MSE of ``logits.squeeze(-1)`` against float targets when
        the head has one output (regression)."""
        if self.num_classes == 1:
            return F.mse_loss(logits.squeeze(-1), targets.to(logits.dtype))
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        optimizer = self.optimizer_factory(p for p in self.parameters() if p.requires_grad)
        if self.lr_schedule == "constant":
            return optimizer
        total = max(1, self.planned_steps or 1)
        warmup = int(self.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
