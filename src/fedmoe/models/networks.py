"""Registry of network architectures, by name or dotted import path.

Configs name the client architecture once; clients, Fed-MoE experts and gates (with a K-way
head) are all built from it with :func:`build_network`. Other model modules add their
architectures with :func:`register_network`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

from torch import nn

from fedmoe.models.vision import CifarResNet18, DigitsCNN, FemnistCNN

NETWORKS: dict[str, type] = {
    "femnist_cnn": FemnistCNN,
    "cifar_resnet18": CifarResNet18,
    "digits_cnn": DigitsCNN,
}

#: Architectures registered by modules with heavy imports, loaded when first looked up.
LAZY_NETWORKS: dict[str, str] = {
    "hf_sequence_classifier": "fedmoe.models.text",
    "text_encoder": "fedmoe.models.text_encoder",
}

_T = TypeVar("_T", bound=type)


def register_network(name: str) -> Callable[[_T], _T]:
    """Class decorator adding an architecture (constructor taking ``num_classes``) to NETWORKS."""

    def decorate(cls: _T) -> _T:
        if name in NETWORKS and NETWORKS[name] is not cls:
            raise ValueError(f"network name {name!r} is already registered to {NETWORKS[name]!r}")
        NETWORKS[name] = cls
        return cls

    return decorate


def _import_class(path: str) -> type:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} for network {path!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from err


def build_network(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A fresh network with a ``num_classes``-way head.

    ``name`` is a key of :data:`NETWORKS` or a dotted path ``pkg.module.Class`` to a class whose
    constructor takes ``num_classes``; extra keyword arguments go to the constructor.
    """
    if name not in NETWORKS and name in LAZY_NETWORKS:
        importlib.import_module(LAZY_NETWORKS[name])
    if name in NETWORKS:
        cls = NETWORKS[name]
    elif "." in name:
        cls = _import_class(name)
    else:
        known = ", ".join(sorted({*NETWORKS, *LAZY_NETWORKS}))
        raise ValueError(
            f"unknown network {name!r}; known names: {known} (or a dotted path pkg.module.Class)"
        )
    return cls(num_classes=num_classes, **kwargs)
