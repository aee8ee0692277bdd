"""Federated LoRA experts on one frozen causal LM: the versioned coordinator and its store."""

from fedmoe.experts.coordinator import (
    Block,
    Correction,
    ExpertCoordinator,
    ExpertMetrics,
    ExpertSnapshot,
    Receipt,
    Update,
    compress_correction,
)
from fedmoe.experts.store import ExpertStore

__all__ = [
    "Block",
    "Correction",
    "ExpertCoordinator",
    "ExpertMetrics",
    "ExpertSnapshot",
    "ExpertStore",
    "Receipt",
    "Update",
    "compress_correction",
]
