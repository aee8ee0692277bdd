"""FedProx (Li et al., 2020): FedAvg with a proximal term in the local objective."""

from __future__ import annotations

import torch
from torch import nn

from fedmoe.algorithms.base import ClientPlan, StateDict, ServerState
from fedmoe.algorithms.fedavg import FedAvg
from fedmoe.validation import check_float


class ProximalTerm:
    """mu/2 * ||w - w_global||^2 over the trainable parameters of the network being trained."""

    def __init__(self, anchor: StateDict, mu: float) -> None:
        self.anchor = anchor
        self.mu = mu

    def __call__(self, module: nn.Module) -> torch.Tensor:
        net = getattr(module, "net", module)
        terms = [
            (p - self.anchor[name].to(p.device, p.dtype)).pow(2).sum()
            for name, p in net.named_parameters()
            if p.requires_grad
        ]
        if not terms:
            return torch.zeros(())
        return 0.5 * self.mu * torch.stack(terms).sum()


class FedProx(FedAvg):
    """FedAvg aggregation; each client minimises loss + mu/2 ||w - w_global||^2.

    Args:
        mu: weight of the proximal term (0 recovers FedAvg).
    """

    #: Options that change training only (evaluating a checkpoint does not require them to match).
    training_options = ("mu",)

    def __init__(self, mu: float = 0.01) -> None:
        check_float("federation.algorithm.mu", mu, 0.0)
        self.mu = mu

    def configure_client(self, state: ServerState, client_id: int, client_weights: StateDict | None) -> ClientPlan:
        anchor = state["global"]
        return ClientPlan(weights=anchor, regularizer=ProximalTerm(anchor, self.mu) if self.mu > 0 else None)
