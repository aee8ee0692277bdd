"""Flower (flwr 1.41, Message API) as a deployment engine for fedmoe's algorithms.

The same :class:`fedmoe.algorithms.base.Algorithm` objects run as a Flower ``Strategy`` on the
server (:mod:`fedmoe.flower.strategy`) and the same client LightningModule trains inside a Flower
``ClientApp`` (:mod:`fedmoe.flower.client`); a ``python -m fedmoe.cli`` config builds both
(:mod:`fedmoe.federation.job`). ``python -m fedmoe.flower --help`` lists the commands; docs/flower.md
describes a multi-machine deployment.

Flower's telemetry is switched off (``FLWR_TELEMETRY_ENABLED=0``) before flwr is first imported,
unless the environment sets it.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
