"""Federated data: client, server, probe, validation and test sets for each data set."""

from fedmoe.data.federated import ArrayDataset, FederatedDataModule, FederatedSplits

__all__ = ["ArrayDataset", "FederatedDataModule", "FederatedSplits"]
