"""The registry of adapter aggregation rules and the base class they share.

Each rule is a pure function over adapter tensors (``fedit_aggregate``, ``fedex_aggregate``, ...)
plus a thin :class:`~fedmoe.algorithms.base.Algorithm` subclass registered here by name, so that
configs and the LoRA-experts coordinator can pick a rule with a string.

The server's ``global`` state holds only the federated subset of the client network's state dict:
every adapter tensor, every other trainable tensor (the classification head, FedAvg'd by every
rule) and, for rules that fold updates into the frozen weights, the base weights of the adapted
layers. Everything else is the common initial client weights, which never travel.
"""

from __future__ import annotations

from typing import Callable, Literal, TypeVar

from torch import nn

from fedmoe.algorithms.base import Algorithm, ClientPlan, ClientResult, ServerContext, ServerState, StateDict
from fedmoe.algorithms.lora.common import adapter_keys, lora_layers, normalise
from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.errors import FedMoEError

RULES: dict[str, type[Algorithm]] = {}
T = TypeVar("T", bound=type)


def register_rule(name: str) -> Callable[[T], T]:
    """Class decorator: make an aggregation rule available as ``get_rule(name)``."""

    def wrap(cls: T) -> T:
        if name in RULES and RULES[name] is not cls:
            raise ValueError(f"aggregation rule {name!r} is already registered as {RULES[name].__name__}")
        RULES[name] = cls
        cls.rule_name = name
        return cls

    return wrap


def get_rule(name: str) -> type[Algorithm]:
    """The rule registered as ``name``; an unknown name lists the known ones."""
    if name not in RULES:
        raise FedMoEError(f"unknown aggregation rule {name!r}; known rules: {', '.join(sorted(RULES))}")
    return RULES[name]


def option(name: str) -> str:
    """The config path of an algorithm option, for messages."""
    return f"federation.algorithm.init_args.{name}"


class LoRARule(Algorithm):
    """Shared plumbing of the adapter rules: the federated subset, client weights, byte counts.

    Args:
        weighting: ``samples`` (p_i = n_i / sum n, the default) or ``uniform`` (p_i = 1/m, as the
            reference implementations).
    """

    rule_name = "lora"
    #: whether the base weights of the adapted layers are part of the federated state
    folds_into_base = False

    def __init__(self, weighting: Literal["samples", "uniform"] = "samples") -> None:
        if weighting not in ("samples", "uniform"):
            raise FedMoEError(f"{option('weighting')} must be 'samples' or 'uniform', got {weighting!r}")
        self.weighting = weighting
        self._state: ServerState | None = None

    # -- state --------------------------------------------------------------------------------

    def init_server(self, template: StateDict, ctx: ServerContext) -> ServerState:
        layers = lora_layers(ctx.adapted_layers(), self.rule_name)
        adapters = adapter_keys(layers)
        missing = sorted(k for layer in layers for k in (layer.a_key, layer.b_key, layer.base_key) if k not in template)
        if missing:
            raise FedMoEError(f"rule {self.rule_name!r}: the model's state dict has no {missing[0]!r}")
        head = sorted(k for k in ctx.trainable_keys() if k not in adapters and k in template)
        keys = [k for layer in layers for k in (layer.a_key, layer.b_key)] + head
        if self.folds_into_base:
            keys += [layer.base_key for layer in layers]
        state = {
            "global": {k: template[k].detach().clone() for k in keys},
            "layers": list(layers),
            "head_keys": head,
            "round": 0,
        }
        self._state = state
        return state

    @staticmethod
    def layers(state: ServerState) -> list[LoRALayer]:
        return state["layers"]

    def client_weights(self, results: list[ClientResult]) -> list[float]:
        """p_i: normalised sample counts, or uniform."""
        if self.weighting == "uniform":
            return [1.0 / len(results)] * len(results)
        return normalise([r.num_samples for r in results])

    # -- protocol -------------------------------------------------------------------------------

    def upload_keys(self, state: ServerState) -> frozenset[str]:
        """The keys a client sends back (default: every adapter tensor and the head)."""
        layers = self.layers(state)
        return frozenset([*adapter_keys(layers), *state["head_keys"]])

    def configure_client(self, state: ServerState, client_id: int, client_weights: StateDict | None) -> ClientPlan:
        self._state = state
        return ClientPlan(weights=state["global"], upload_keys=self.upload_keys(state))

    def upload_bytes(self, result: ClientResult) -> int:
        """Bytes of the uploaded tensors this rule aggregates (the upload keys only)."""
        keys = self.upload_keys(self._state) if self._state is not None else result.weights.keys()
        return sum(t.numel() * t.element_size() for k, t in result.weights.items() if k in keys)

    def server_module(self, state: ServerState, ctx: ServerContext) -> nn.Module:
        """The global subset loaded over the common initial weights (the frozen rest)."""
        return ctx.load_network({**ctx.client_template(), **state["global"]})

