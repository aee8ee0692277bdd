"""The Algorithm protocol: pure logic over state dicts and tensors.

An algorithm never builds a Trainer, reads a file or keeps globals. Server-side compute that an
algorithm needs (running client weights on the probe set, training a gate) is asked of the
:class:`ServerContext`, which the engine implements with Lightning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

StateDict = dict[str, torch.Tensor]
ServerState = dict[str, Any]


@dataclass
class ClientPlan:
    """What a sampled client receives: the weights to load and its local training options."""

    weights: StateDict
    transmit: bool = True
    """Whether ``weights`` travel to the client (False when it already holds them)."""
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None
    """Added to the local loss at every step (FedProx's proximal term)."""
    options: dict[str, Any] = field(default_factory=dict)
    upload_keys: frozenset[str] | None = None
    """State-dict keys the client sends back after training (None: all of them). Adapter rules
    send only what they aggregate; ``weights`` may then also be a subset of the network's keys,
    loaded over the network's current values."""
    keep_keys: frozenset[str] = frozenset()
    """State-dict keys the client keeps to itself after training (FedSA-LoRA's personal B and head):
    returned beside the upload in :attr:`ClientResult.kept`, never sent."""
    wire_bytes: int | None = None
    """Bytes that really travel to the client, when they differ from ``weights``'s (a residual sent
    as low-rank factors, a frozen matrix the client already holds); None: ``num_bytes(weights)``."""


@dataclass
class ClientResult:
    """What a client sends back after local training."""

    client_id: int
    num_samples: int
    weights: StateDict
    metrics: dict[str, float] = field(default_factory=dict)
    base_version: int = 0
    kept: StateDict = field(default_factory=dict)
    """What the client kept locally (``ClientPlan.keep_keys``): it never travels; :meth:`Algorithm.sync`
    may combine it with what the server broadcasts, as the client itself would."""


class ServerContext(Protocol):
    """Server-side compute and data, implemented by the engine with Lightning."""

    probe: Dataset
    server_train: Dataset
    val: Dataset
    num_classes: int

    def build_network(self, num_outputs: int | None = None) -> nn.Module:
        """A fresh client-architecture network with a ``num_outputs``-way head (default: the classes)."""

    def load_network(self, weights: StateDict) -> nn.Module:
        """A reused client-architecture network holding ``weights`` (for evaluation)."""

    def client_template(self) -> StateDict:
        """The common initial client weights."""

    def predict(self, module: nn.Module, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs of ``module`` on ``dataset`` in eval mode and the targets, in dataset order."""

    def fit(
        self, module: nn.Module, dataset: Dataset, epochs: int, optimizer_state: dict | None = None
    ) -> dict | None:
        """Train a LightningModule on ``dataset``; return its optimizer state."""

    def evaluate(self, module: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Mean loss and accuracy of a classifier on ``dataset`` (keys ``loss``, ``acc``), plus the
        data set's own metrics (GLUE: ``mcc``, ``f1``, ``pearson``, ...)."""

    def adapted_layers(self) -> list:
        """The client network's PEFT-adapted layers (:mod:`fedmoe.algorithms.lora.layout`);
        empty for networks without adapters."""

    def trainable_keys(self) -> set[str]:
        """State-dict keys of the client network's trainable parameters (as built, before any
        algorithm freezes some)."""


class Algorithm(ABC):
    """Base class of federated algorithms (configure per client, aggregate, optional sync)."""

    #: True when clients keep personal weights between rounds (so the engine stores them).
    personalised: bool = False
    #: True when :meth:`sync` sends the clients new weights (counted as bytes down).
    sync_transmits: bool = False

    @abstractmethod
    def init_server(self, template: StateDict, ctx: ServerContext) -> ServerState:
        """The server state before round 1, from the common initial client weights."""

    def configure_client(
        self, state: ServerState, client_id: int, client_weights: StateDict | None
    ) -> ClientPlan:
        """Weights and options for one sampled client (default: the global model)."""
        return ClientPlan(weights=state["global"])

    @abstractmethod
    def aggregate(
        self, state: ServerState, results: list[ClientResult], ctx: ServerContext
    ) -> ServerState:
        """The next server state from this round's client results."""

    def sync(
        self, state: ServerState, results: list[ClientResult], ctx: ServerContext
    ) -> dict[int, StateDict]:
        """Weights each participating client keeps after the round (default: the global model)."""
        return {r.client_id: state["global"] for r in results}

    def server_module(self, state: ServerState, ctx: ServerContext) -> nn.Module:
        """The server model to evaluate (the global model, or Fed-MoE's mixture)."""
        return ctx.load_network(state["global"])

    def upload_bytes(self, result: ClientResult) -> int:
        """Bytes a client's upload costs on the wire (default: every tensor it returned)."""
        from fedmoe.algorithms.fusion import num_bytes

        return num_bytes(result.weights)

    def frozen_keys(self, ctx: ServerContext) -> set[str]:
        """Parameters that clients never train (FFA-LoRA's shared ``lora_A``); default none."""
        return set()

    def round_metrics(self, state: ServerState) -> dict[str, Any]:
        """Algorithm-specific scalars (and images as 2-D tensors under ``image/``) to log."""
        return {}
