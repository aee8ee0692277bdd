"""Federated algorithms: pure logic over state dicts and tensors."""

from fedmoe.algorithms.base import Algorithm, ClientPlan, ClientResult, ServerContext
from fedmoe.algorithms.fedavg import FedAvg
from fedmoe.algorithms.fedprox import FedProx

__all__ = ["Algorithm", "ClientPlan", "ClientResult", "FedAvg", "FedProx", "ServerContext"]
