"""The executor interface: train a round's clients, return results or failures."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedmoe.algorithms.base import ClientPlan, ClientResult

if TYPE_CHECKING:
    from fedmoe.data.federated import FederatedDataModule
    from fedmoe.federation.runner import RunnerSettings
    from lightning import LightningModule


@dataclass
class ClientTask:
    """One sampled client's work for a round."""

    client_id: int
    plan: ClientPlan
    optimizer_state: dict | None = None
    keep_optimizer: bool = False
    """Return the optimizer state after training (persistent client optimizers)."""


@dataclass
class ClientFailure:
    """A client whose training raised; it is dropped from the round."""

    client_id: int
    error: str


@dataclass
class ClientOutcome:
    """A finished client: its result plus the optimizer state to keep if optimizers persist."""

    result: ClientResult
    optimizer_state: dict | None = None


class Executor(ABC):
    """Runs local training for a list of client tasks.

    :meth:`bind` is called once before the first round with the client module (whose ``net``
    travels), the data module and the local training settings.
    """

    def bind(self, module: "LightningModule", datamodule: "FederatedDataModule", settings: "RunnerSettings") -> None:
        self.module = module
        self.datamodule = datamodule
        self.settings = settings

    @abstractmethod
    def run(self, tasks: list[ClientTask]) -> list[ClientOutcome | ClientFailure]:
        """Train every task's client; one outcome or failure per task, in task order."""

    def close(self) -> None:
        """Release workers (processes, devices)."""
