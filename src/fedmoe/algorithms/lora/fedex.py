"""FedEx-LoRA (Singhal et al., ACL 2025): FedIT plus the residual folded into the frozen base.

With p_i normalised, A_bar = sum p_i A_i and B_bar = sum p_i B_i (FedIT), the residual

    R = sum_i p_i B_i A_i - B_bar A_bar = sum_{i<m} p_i (B_i - B_m)(A_i - A_bar)

is added to each adapted base weight: W <- W + to_base_layout(s R, fan_in_fan_out). Then
W' + s B_bar A_bar = sum_i p_i (W + s B_i A_i): exact, because every client of the round started
from the same W. R is computed from its factors in one matmul per layer (rank <= (m-1) r), never
from the clients' B_i A_i one by one. The reference code always transposes R, which is right only
for GPT-2's Conv1D (``fan_in_fan_out``).

Wire: down, the adapters and head plus, per adapted layer, every residual made since the client last
received the base, as factors of their summed rank or dense d_out x d_in, whichever is smaller
(nothing in round 1: the initial base is common); up, the adapters and head.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch

from fedmoe.algorithms.base import ClientPlan, ClientResult, ServerContext, ServerState, StateDict
from fedmoe.algorithms.fusion import num_bytes
from fedmoe.algorithms.lora.common import BaseHistory, factor_bytes, fold, layer_dims, residual_factors
from fedmoe.algorithms.lora.fedit import fedit_aggregate
from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.algorithms.lora.rules import LoRARule, register_rule


def fedex_aggregate(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    layers: Sequence[LoRALayer],
    client_ids: Sequence[int] | None = None,
    inplace: bool = False,
    rule: str = "fedex",
) -> tuple[StateDict, dict[str, Any]]:
    """(new global state, info): FedIT means, and each adapted base weight plus s R.

    ``global_state`` holds the adapted layers' base weights (``layer.base_key``), which all clients
    of the round trained on. ``inplace`` folds into those tensors instead of new ones (saves one copy
    of each base weight; the caller's state changes). ``info``: per layer name, ``rank`` (columns of
    the residual's factors, (m-1) r), ``bytes`` (its smaller wire form) and ``factors`` (whether that
    form is the factors).
    """
    new, _ = fedit_aggregate(global_state, client_states, weights, layers, client_ids, rule)
    p = [float(w) / float(sum(weights)) for w in weights]
    info: dict[str, Any] = {"rank": {}, "bytes": {}, "factors": {}}
    for layer in layers:
        u, v = residual_factors(
            [s[layer.b_key] for s in client_states], [s[layer.a_key] for s in client_states], p, new[layer.a_key]
        )
        base = global_state[layer.base_key]
        new[layer.base_key] = fold(base, u, v, layer.scaling, layer.fan_in_fan_out, inplace=inplace)
        d_out, d_in = layer_dims(layer, global_state)
        size, factors = factor_bytes(u.shape[1], d_out, d_in, base.element_size())
        info["rank"][layer.name] = int(u.shape[1])
        info["bytes"][layer.name] = size
        info["factors"][layer.name] = factors
    return new, info


@register_rule("fedex")
class FedExLoRA(LoRARule):
    """FedEx-LoRA: exact aggregation by folding the FedIT residual into the adapted base weights.

    Clients receive the corrected base weights of the adapted layers only (the rest of the frozen
    model is common); bytes down count the residuals they miss in their smaller form.

    Args:
        weighting: ``samples`` (p_i = n_i / sum n) or ``uniform``.
        in_place: fold the residual into the server state's base tensors instead of new ones: no
            second copy of the adapted base weights during aggregation, but the state passed to
            :meth:`aggregate` changes (the engine discards it).
    """

    folds_into_base = True

    def __init__(self, weighting: Literal["samples", "uniform"] = "samples", in_place: bool = False) -> None:
        super().__init__(weighting)
        self.in_place = bool(in_place)

    def init_server(self, template: StateDict, ctx: ServerContext) -> ServerState:
        state = super().init_server(template, ctx)
        state["history"] = BaseHistory.new()
        state["info"] = {}
        return state

    def upload_keys(self, state: ServerState) -> frozenset[str]:
        bases = {layer.base_key for layer in self.layers(state)}
        return frozenset(k for k in state["global"] if k not in bases)

    def configure_client(self, state: ServerState, client_id: int, client_weights: StateDict | None) -> ClientPlan:
        self._state = state
        keys = self.upload_keys(state)
        layers = self.layers(state)
        wire = num_bytes({k: state["global"][k] for k in keys})
        wire += BaseHistory.wire_bytes(state["history"], client_id, layers, state["global"])
        return ClientPlan(weights=state["global"], upload_keys=keys, wire_bytes=wire)

    def aggregate(self, state: ServerState, results: list[ClientResult], ctx: ServerContext) -> ServerState:
        ids = [r.client_id for r in results]
        new, info = fedex_aggregate(
            state["global"], [r.weights for r in results], self.client_weights(results), self.layers(state), ids,
            inplace=self.in_place, rule=self.rule_name,
        )
        history = BaseHistory.advance(state["history"], info["rank"], ids)
        return {**state, "global": new, "round": state["round"] + 1, "history": history, "info": info}

    def round_metrics(self, state: ServerState) -> dict[str, Any]:
        info = state.get("info") or {}
        if not info:
            return {}
        return {
            "lora/residual_rank": max(info["rank"].values(), default=0),
            "lora/residual_bytes": sum(info["bytes"].values()),
            "lora/residual_factor_layers": sum(bool(f) for f in info["factors"].values()),
            "lora/residual_dense_layers": sum(not f for f in info["factors"].values()),
        }
