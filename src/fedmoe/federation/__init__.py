"""The federated engine: one round loop for every algorithm."""
