"""Networks and modules, generic over data sets."""

from fedmoe.models.networks import NETWORKS, build_network, register_network

__all__ = ["NETWORKS", "build_network", "register_network"]
