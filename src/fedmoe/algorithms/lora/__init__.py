"""Federated LoRA: aggregation rules over adapter tensors (one module per rule)."""
