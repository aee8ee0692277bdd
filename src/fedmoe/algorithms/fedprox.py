"""FedProx (Li et al., 2020): FedAvg with a proximal term in the local objective."""

from __future__ import annotations

import torch
from torch import nn

from fedmoe.algorithms.base import ClientPlan, StateDict, ServerState
from fedmoe.algorithms.fedavg import FedAvg
from fedmoe.validation import check_float


class ProximalTerm:
    """mu/2 * ||w - w_global||^2 over the trainable parameters of the network being trained.

    Called on a module, the term is one autograd node over all parameters (:class:`_Proximal`):
    its gradient mu (w - w_global) is written in two fused passes instead of the per-parameter
    subtract, square, sum and their backward, bit for bit the gradient of the plain formula.
    :meth:`formula` is that plain formula, for functional transforms (``torch.func``) that need
    every operation traced.
    """

    def __init__(self, anchor: StateDict, mu: float) -> None:
        self.anchor = anchor
        self.mu = mu

    def _pairs(self, module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        net = getattr(module, "net", module)
        named = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
        return [p for _, p in named], [self.anchor[name].to(p.device, p.dtype) for name, p in named]

    def __call__(self, module: nn.Module) -> torch.Tensor:
        params, anchors = self._pairs(module)
        if not params:
            return torch.zeros(())
        return _Proximal.apply(0.5 * self.mu, anchors, *params)

    def formula(self, module) -> torch.Tensor:
        """0.5 * mu * sum over parameters of sum((w - w_global)^2), as plain differentiable ops."""
        params, anchors = self._pairs(module)
        if not params:
            return torch.zeros(())
        return 0.5 * self.mu * torch.stack([(p - a).pow(2).sum() for p, a in zip(params, anchors)]).sum()


class _Proximal(torch.autograd.Function):
    """``scale * sum ||p - a||^2`` with gradient ``(grad * scale) * 2 (p - a)`` per parameter: the
    value and rounding of the plain formula's gradient (the scalings by 2 are exact), from one fused
    subtract kept for the backward and one fused multiply there."""

    @staticmethod
    def forward(ctx, scale: float, anchors: list[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        diffs = torch._foreach_sub(params, anchors)
        ctx.scale = scale
        ctx.save_for_backward(*diffs)
        norms = torch._foreach_norm(diffs)
        return scale * torch.stack(norms).pow(2).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        diffs = list(ctx.saved_tensors)
        factor = grad * ctx.scale * 2
        torch._foreach_mul_(diffs, factor)
        return (None, None, *diffs)


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
