"""The executor interface: train a round's clients, return results or failures."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from fedmoe.algorithms.base import ClientPlan, ClientResult
from fedmoe.data.federated import client_seed

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
    round: int = 0
    """The round being trained (with ``seed`` and ``client_id``, the client's random numbers)."""
    seed: int = 0
    """The run's seed."""


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

    def check(self, algorithm) -> None:
        """Raise :class:`fedmoe.errors.ConfigError` if this executor cannot run ``algorithm``'s clients
        (called once, after :meth:`bind`)."""

    def close(self) -> None:
        """Release workers (processes, devices)."""


@contextmanager
def client_rng(task: ClientTask, device: torch.device | str | None = None) -> Iterator[None]:
    """Torch's global RNG (the CPU's and ``device``'s, if CUDA) seeded for ``task``'s client and round
    alone, and restored on exit: the model's own randomness during local training (dropout) does
    not depend on which clients trained before it, and training leaves the global RNG as it was."""
    seed = client_seed(task.seed, task.round, task.client_id, stream=1)
    device = torch.device(device) if device is not None else None
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device is not None and device.type == "cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
