"""Server-side training of the Fed-MoE gate (Stage B's server step) as a LightningModule.

By default only G, G_n and alpha train, with the experts and main expert(s) frozen in eval mode
so that their BatchNorm statistics do not move; ``train_experts`` (the CIFAR code) trains the
experts too, each parameter group at its own learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from fedmoe.models.moe import EntropyMode, LoadMode, ServerMoE, server_loss


class ServerMoEModule(L.LightningModule):
    """Trains a :class:`ServerMoE` on the server set D_s with the Fed-MoE server loss.

    ``forward`` returns the logits only, so the same evaluation code serves any classifier.
    With ``train_experts`` false the experts and mains get ``requires_grad=False`` and stay in
    eval mode; with it true their ``requires_grad`` flags are left as the backbone set them.
    """

    def __init__(
        self,
        moe: ServerMoE,
        *,
        label_smoothing: float = 0.0,
        w_aux: float = 1.0,
        w_ent: float = 0.1,
        load: LoadMode = "count",
        entropy_mode: EntropyMode = "paper",
        gate_lr: float = 1e-4,
        alpha_lr: float = 1e-3,
        weight_decay: float = 5e-4,
        eps: float = 1e-6,
        train_experts: bool = False,
        expert_lr: float = 1e-4,
        main_lr: float = 5e-5,
        experts_alpha_lr: float = 5e-7,
        train_noise: bool = True,
        no_decay: Sequence[str] = (),
        eps_groups: Sequence[str] | None = None,
        optimizer: str = "adam",
        momentum: float = 0.0,
    ) -> None:
        super().__init__()
        self.moe = moe
        self.label_smoothing = label_smoothing
        self.w_aux = w_aux
        self.w_ent = w_ent
        self.load = load
        self.entropy_mode = entropy_mode
        self.gate_lr = gate_lr
        self.alpha_lr = alpha_lr
        self.weight_decay = weight_decay
        self.eps = eps
        self.train_experts = train_experts
        self.expert_lr = expert_lr
        self.main_lr = main_lr
        self.experts_alpha_lr = experts_alpha_lr
        self.train_noise = train_noise
        self.no_decay = tuple(no_decay)
        self.eps_groups = None if eps_groups is None else tuple(eps_groups)
        self.optimizer = optimizer
        self.momentum = momentum
        self.lr_scale = 1.0
        if not train_experts:
            moe.experts.requires_grad_(False)
            moe.mains.requires_grad_(False)
            moe.experts.eval()
            moe.mains.eval()

    def train(self, mode: bool = True) -> ServerMoEModule:
        """Set train/eval mode; frozen experts and mains always stay in eval mode."""
        super().train(mode)
        if not self.train_experts:
            self.moe.experts.eval()
            self.moe.mains.eval()
        return self

    def forward(self, x: Any) -> Tensor:
        """The MoE's logits y (B x C)."""
        return self.moe(x).logits

    def training_step(self, batch: tuple[Any, Tensor], batch_idx: int) -> Tensor:
        """The server loss on one batch (x, t) of D_s."""
        x, targets = batch
        loss, _ = server_loss(
            self.moe(x),
            targets,
            self.moe,
            label_smoothing=self.label_smoothing,
            w_aux=self.w_aux,
            w_ent=self.w_ent,
            load=self.load,
            entropy_mode=self.entropy_mode,
        )
        return loss

    def learning_rates(self) -> dict[str, float]:
        """The learning rate of each parameter group by name, times ``lr_scale`` (the server
        schedule's factor for this fit)."""
        rates = {"gate": self.gate_lr, "alpha": self.experts_alpha_lr if self.train_experts else self.alpha_lr}
        if self.train_experts:
            rates.update(experts=self.expert_lr, mains=self.main_lr)
        return {name: lr * self.lr_scale for name, lr in rates.items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam (or SGD with ``momentum``, ``optimizer="sgd"``) over named groups: gate (G, and G_n
        unless ``train_noise`` is false), alpha; experts and mains if ``train_experts``. Groups named
        in ``no_decay`` get no weight decay; with Adam only those in ``eps_groups`` (default: all) get
        ``eps``, the rest Adam's default 1e-8."""
        gate_params = list(self.moe.gate.parameters())
        if self.moe.noise is not None and self.train_noise:
            gate_params += list(self.moe.noise.parameters())
        params = {"gate": gate_params, "alpha": [self.moe.alpha]}
        if self.train_experts:
            params.update(experts=list(self.moe.experts.parameters()), mains=list(self.moe.mains.parameters()))
        groups = []
        for name, lr in self.learning_rates().items():
            trainable = [p for p in params[name] if p.requires_grad]
            if not trainable:
                continue
            group = {"name": name, "params": trainable, "lr": lr,
                     "weight_decay": 0.0 if name in self.no_decay else self.weight_decay}
            if self.optimizer == "adam":
                group["eps"] = self.eps if self.eps_groups is None or name in self.eps_groups else 1e-8
            groups.append(group)
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=groups[0]["lr"] if groups else 0.0, momentum=self.momentum)
        return torch.optim.Adam(groups)


class ExpertModule(L.LightningModule):
    """One expert trained alone on server data with cross-entropy (the CIFAR code's ``main_epochs``)."""

    def __init__(self, net: torch.nn.Module, lr: float = 5e-5, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.label_smoothing = label_smoothing

    def forward(self, x: Any) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Any, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y, label_smoothing=self.label_smoothing)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)
