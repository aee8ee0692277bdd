"""Executors decide who runs the sampled clients' local training."""

from __future__ import annotations

import importlib

from fedmoe.errors import ConfigError
from fedmoe.executors.base import ClientFailure, ClientTask, Executor
from fedmoe.executors.sequential import Sequential

#: Executors by the name ``federation.executor`` accepts, as ``module:Class`` (imported when chosen).
EXECUTORS: dict[str, str] = {
    "sequential": "fedmoe.executors.sequential:Sequential",
    "vectorized": "fedmoe.executors.vectorized:Vectorized",
    "parallel": "fedmoe.executors.parallel:Parallel",
}


def build_executor(executor: Executor | str) -> Executor:
    """An executor with default options from its name (``sequential``, ``vectorized``, ``parallel``);
    an :class:`Executor` is returned as it is."""
    if isinstance(executor, Executor):
        return executor
    name = str(executor).lower()
    if name not in EXECUTORS:
        raise ConfigError(f"federation.executor={executor!r} is not an executor; use one of {', '.join(EXECUTORS)}")
    module_name, _, cls = EXECUTORS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"federation.executor={name} is not available here ({e}); use sequential") from None
    return getattr(module, cls)()


__all__ = ["EXECUTORS", "ClientFailure", "ClientTask", "Executor", "Sequential", "build_executor"]
