"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at its shared seeded initialisation, only B trained.

Every client holds the same A (PEFT's initialisation under the common seed), so
sum_i p_i (W + s B_i A) = W + s B_bar A: averaging B is exact. Wire: down, B and the head (A
once, in a client's first round; never again); up, B and the head. PEFT still lists a frozen
``lora_A`` among the adapter weights: it is filtered out of the upload here.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from fedmoe.algorithms.base import ClientPlan, ClientResult, ServerContext, ServerState, StateDict
from fedmoe.algorithms.fusion import num_bytes
from fedmoe.algorithms.lora.common import check_uploads, lora_layers, mean_of_keys, normalise
from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.algorithms.lora.rules import LoRARule, register_rule
from fedmoe.errors import FedMoEError


def ffa_aggregate(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    layers: Sequence[LoRALayer],
    client_ids: Sequence[int] | None = None,
    rule: str = "ffa",
) -> tuple[StateDict, dict[str, Any]]:
    """(new global state, info): B and the head replaced by their p-weighted means; A unchanged.

    A client that uploads a ``lora_A`` different from the global one trained it, which breaks the
    rule's exactness: that is an error (freeze A with :meth:`FFALoRA.frozen_keys`).
    """
    p = normalise(weights)
    ids = list(client_ids) if client_ids is not None else list(range(len(client_states)))
    a_keys = {layer.a_key for layer in layers}
    bases = {layer.base_key for layer in layers}
    keys = [k for k in global_state if k not in a_keys and k not in bases]
    check_uploads(client_states, keys, rule, ids)
    check_uploads([global_state, client_states[0]], keys, rule, ["the server", ids[0]])
    for cid, state in zip(ids, client_states):
        for k in sorted(a_keys & state.keys()):
            if not torch.equal(state[k], global_state[k]):
                raise FedMoEError(
                    f"rule {rule!r}: client {cid} changed the frozen {k!r}; FFA-LoRA needs lora_A frozen "
                    "(the engine freezes FFALoRA.frozen_keys)"
                )
    new = dict(global_state)
    new.update(mean_of_keys(client_states, p, keys))
    return new, {}


@register_rule("ffa")
class FFALoRA(LoRARule):
    """FFA-LoRA: lora_A frozen and never uploaded; B and the head averaged (exact).

    Args:
        weighting: ``samples`` (p_i = n_i / sum n) or ``uniform``.
    """

    def init_server(self, template: StateDict, ctx: ServerContext) -> ServerState:
        state = super().init_server(template, ctx)
        state["seen"] = []
        return state

    def frozen_keys(self, ctx: ServerContext) -> set[str]:
        return {layer.a_key for layer in lora_layers(ctx.adapted_layers(), self.rule_name)}

    def upload_keys(self, state: ServerState) -> frozenset[str]:
        a_keys = {layer.a_key for layer in self.layers(state)}
        return frozenset(k for k in state["global"] if k not in a_keys)

    def configure_client(self, state: ServerState, client_id: int, client_weights: StateDict | None) -> ClientPlan:
        self._state = state
        keys = self.upload_keys(state)
        wire = num_bytes({k: state["global"][k] for k in keys})
        if client_id not in state["seen"]:
            wire += num_bytes({layer.a_key: state["global"][layer.a_key] for layer in self.layers(state)})
        return ClientPlan(weights=state["global"], upload_keys=keys, wire_bytes=wire)

    def aggregate(self, state: ServerState, results: list[ClientResult], ctx: ServerContext) -> ServerState:
        ids = [r.client_id for r in results]
        new, _ = ffa_aggregate(
            state["global"], [r.weights for r in results], self.client_weights(results), self.layers(state), ids,
            self.rule_name,
        )
        seen = sorted(set(state["seen"]) | set(ids))
        return {**state, "global": new, "round": state["round"] + 1, "seen": seen}
