"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' adapters and merge the exact sum.

A_st = [p_1 s_1 A_1; ...; p_m s_m A_m] and B_st = [B_1 ... B_m] give
B_st A_st = sum_i p_i s_i B_i A_i, with ranks r_i free to differ. It is merged into each adapted
base weight at scale 1 (W <- W + to_base_layout(B_st A_st)), and the next round starts from fresh
adapters: B = 0 and A drawn as PEFT does (kaiming-uniform, a = sqrt(5)) from a generator seeded by
(seed, round), so every client draws the same A without it travelling. With every client of the
round starting from the same W and B = 0, W' = sum_i p_i (W + s_i B_i A_i): exact.
PEFT's ``add_weighted_adapter(combination_type="cat")`` stacks the same way but mis-scales under
rsLoRA and refuses a shared ``modules_to_save``, hence the stacking here.

Heterogeneous ranks: with ``client_ranks``, client k trains only the first r_k ranks of the
network's adapters (A's other rows are sent as zero and B starts at zero, so they get no gradient
and stay zero) and only r_k ranks are stacked and counted.

Wire: down, the head plus, per adapted layer, the merges since the client last received the base
(stacked factors of their summed rank, or dense, whichever is smaller); up, the adapters at the
client's rank r_k, and the head.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Sequence

import torch

from fedmoe.algorithms.base import ClientPlan, ClientResult, ServerContext, ServerState, StateDict
from fedmoe.algorithms.fusion import num_bytes
from fedmoe.algorithms.lora.common import (
    BaseHistory,
    factor_bytes,
    fold,
    layer_dims,
    mixed_rank_start,
)
from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.algorithms.lora.rules import LoRARule, option, register_rule
from fedmoe.errors import FedMoEError


def flora_aggregate(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    layers: Sequence[LoRALayer],
    client_ids: Sequence[int] | None = None,
    scalings: Sequence[Mapping[str, float]] | None = None,
    inplace: bool = False,
    rule: str = "flora",
) -> tuple[StateDict, dict[str, Any]]:
    """(new global state, info): sum_i p_i s_i B_i A_i merged into each adapted base weight, the head
    averaged, every B set to zero (A is left as it is: the caller draws the next round's).

    Client i's A_i (r_i x d_in) and B_i (d_out x r_i) may have any rank r_i. ``scalings[i][name]``
    overrides s_i of a layer (default ``layer.scaling``: one network for every client). ``inplace``
    merges into the given base tensors instead of new ones. ``info``:
    per layer name, ``rank`` (sum r_i, the stacked rank), ``bytes`` and ``factors`` (smaller wire form).
    """
    p, new = mixed_rank_start(global_state, client_states, weights, layers, client_ids, rule)
    info: dict[str, Any] = {"rank": {}, "bytes": {}, "factors": {}}
    for layer in layers:
        base = global_state[layer.base_key]
        dt = torch.promote_types(base.dtype, torch.float32)
        s = [layer.scaling if scalings is None else float(scalings[i].get(layer.name, layer.scaling)) for i in range(len(p))]
        a_st = torch.cat([st[layer.a_key].to(dt) * (w * si) for st, w, si in zip(client_states, p, s)], dim=0)
        b_st = torch.cat([st[layer.b_key].to(dt) for st in client_states], dim=1)
        new[layer.base_key] = fold(base, b_st, a_st, 1.0, layer.fan_in_fan_out, inplace=inplace)
        new[layer.b_key] = torch.zeros_like(global_state[layer.b_key])
        d_out, d_in = layer_dims(layer, global_state)
        size, factors = factor_bytes(int(a_st.shape[0]), d_out, d_in, base.element_size())
        info["rank"][layer.name] = int(a_st.shape[0])
        info["bytes"][layer.name] = size
        info["factors"][layer.name] = factors
    return new, info


def fresh_lora_a(
    layers: Sequence[LoRALayer], state: Mapping[str, torch.Tensor], seed: int, round_: int
) -> StateDict:
    """New ``lora_A`` tensors as PEFT initialises them (kaiming-uniform, a = sqrt(5)), drawn in layer
    order from a generator seeded by (seed, round): the same on every client and server, and
    independent of the global RNG."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(round_)) % (2**63))
    out: StateDict = {}
    for layer in layers:
        ref = state[layer.a_key]
        t = torch.empty(ref.shape, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        out[layer.a_key] = t.to(ref.dtype)
    return out


def rank_for(client_id: int, client_ranks: Sequence[int] | None, full: int) -> int:
    """Client ``client_id``'s rank: ``client_ranks`` cycled over client ids, capped at ``full``."""
    if not client_ranks:
        return full
    return min(int(client_ranks[client_id % len(client_ranks)]), full)


def truncate(
    state: Mapping[str, torch.Tensor], layers: Sequence[LoRALayer], rank: int, zero_pad: bool
) -> StateDict:
    """Each layer's adapters cut to the first ``rank`` ranks (A[:r], B[:, :r]); with ``zero_pad`` the
    full shapes are kept and the other ranks set to zero instead."""
    out: StateDict = {}
    for layer in layers:
        a, b = state[layer.a_key], state[layer.b_key]
        r = min(rank, a.shape[0])
        if zero_pad:
            a2, b2 = torch.zeros_like(a), torch.zeros_like(b)
            a2[:r], b2[:, :r] = a[:r], b[:, :r]
            out[layer.a_key], out[layer.b_key] = a2, b2
        else:
            out[layer.a_key], out[layer.b_key] = a[:r], b[:, :r]
    return out


def check_ranks(client_ranks: list[int] | None) -> None:
    if client_ranks is not None and (not client_ranks or any(int(r) < 1 for r in client_ranks)):
        raise FedMoEError(f"{option('client_ranks')} must be a non-empty list of ranks >= 1, got {client_ranks}")


@register_rule("flora")
class FLoRA(LoRARule):
    """FLoRA: stacked, exact merge into the base weights; fresh adapters every round.

    Args:
        weighting: ``samples`` (p_i = n_i / sum n) or ``uniform``.
        seed: seeds the fresh ``lora_A`` of each round (with the round number).
        client_ranks: optional ranks cycled over client ids (client k trains rank
            ``client_ranks[k % len]``, at most the network's); None: every client at full rank.
        in_place: merge into the server state's base tensors instead of new ones (no second copy
            of the adapted base weights; the state passed to :meth:`aggregate` changes).
    """

    folds_into_base = True

    def __init__(
        self,
        weighting: Literal["samples", "uniform"] = "samples",
        seed: int = 0,
        client_ranks: list[int] | None = None,
        in_place: bool = False,
    ) -> None:
        super().__init__(weighting)
        check_ranks(client_ranks)
        self.in_place = bool(in_place)
        self.seed = int(seed)
        self.client_ranks = [int(r) for r in client_ranks] if client_ranks is not None else None

    def init_server(self, template: StateDict, ctx: ServerContext) -> ServerState:
        state = super().init_server(template, ctx)
        state["history"] = BaseHistory.new()
        state["info"] = {}
        return state

    def _rank(self, state: ServerState, client_id: int) -> int:
        full = max(state["global"][layer.a_key].shape[0] for layer in self.layers(state))
        return rank_for(client_id, self.client_ranks, full)

    def upload_keys(self, state: ServerState) -> frozenset[str]:
        bases = {layer.base_key for layer in self.layers(state)}
        return frozenset(k for k in state["global"] if k not in bases)

    def configure_client(self, state: ServerState, client_id: int, client_weights: StateDict | None) -> ClientPlan:
        self._state = state
        layers = self.layers(state)
        weights = dict(state["global"])
        if self.client_ranks is not None:
            weights.update(truncate(state["global"], layers, self._rank(state, client_id), zero_pad=True))
        wire = num_bytes({k: state["global"][k] for k in state["head_keys"]})
        wire += BaseHistory.wire_bytes(state["history"], client_id, layers, state["global"])
        return ClientPlan(weights=weights, upload_keys=self.upload_keys(state), wire_bytes=wire)

    def upload_bytes(self, result: ClientResult) -> int:
        """The head, and each layer's adapters at the client's rank only."""
        state = self._state
        if state is None:
            return super().upload_bytes(result)
        cut = truncate(result.weights, self.layers(state), self._rank(state, result.client_id), zero_pad=False)
        head = {k: result.weights[k] for k in state["head_keys"] if k in result.weights}
        return num_bytes(cut) + num_bytes(head)

    def aggregate(self, state: ServerState, results: list[ClientResult], ctx: ServerContext) -> ServerState:
        layers = self.layers(state)
        ids = [r.client_id for r in results]
        states = []
        for r in results:
            cut = truncate(r.weights, layers, self._rank(state, r.client_id), zero_pad=False) if self.client_ranks else {}
            states.append({**r.weights, **cut})
        new, info = flora_aggregate(
            state["global"], states, self.client_weights(results), layers, ids, inplace=self.in_place,
            rule=self.rule_name,
        )
        round_ = state["round"] + 1
        new.update(fresh_lora_a(layers, state["global"], self.seed, round_))
        history = BaseHistory.advance(state["history"], info["rank"], ids)
        return {**state, "global": new, "round": round_, "history": history, "info": info}

    def round_metrics(self, state: ServerState) -> dict[str, Any]:
        info = state.get("info") or {}
        if not info:
            return {}
        return {
            "lora/merge_rank": max(info["rank"].values(), default=0),
            "lora/merge_bytes": sum(info["bytes"].values()),
            "lora/merge_dense_layers": sum(not f for f in info["factors"].values()),
        }
