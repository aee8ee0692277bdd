"""Executors decide who runs the sampled clients' local training."""

from fedmoe.executors.base import ClientFailure, ClientTask, Executor
from fedmoe.executors.sequential import Sequential

__all__ = ["ClientFailure", "ClientTask", "Executor", "Sequential"]
