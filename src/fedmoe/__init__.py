"""fedmoe: heterogeneous federated learning with mixtures of experts, on PyTorch Lightning."""

__version__ = "0.1.0"
