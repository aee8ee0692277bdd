"""FedSA-LoRA (Guo et al., ICLR 2025): only A is shared; B and the head are personal.

A <- sum_i p_i A_i is broadcast; each client keeps its own B and head between rounds and
trains them together with the global A. Wire: down, the A tensors; up, the A tensors.

Clients upload only A (``upload_keys``); B and the head are kept on the client (``keep_keys``: the
executor returns them in ``ClientResult.kept``, which never travels), and :meth:`~FedSALoRA.sync`
combines the broadcast A with each client's own B and head, as the client itself does.

The server model (evaluation only, a simulation view that exists in no deployment) is the global A
with the p-weighted means of the round's kept B and heads; each client's own model is what the
rule is judged by.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fedmoe.algorithms.base import ClientPlan, ClientResult, ServerContext, ServerState, StateDict
from fedmoe.algorithms.lora.common import check_uploads, mean_of_keys, normalise
from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.algorithms.lora.rules import LoRARule, register_rule


def fedsa_aggregate(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    layers: Sequence[LoRALayer],
    client_ids: Sequence[int] | None = None,
    rule: str = "fedsa",
) -> tuple[StateDict, dict[str, Any]]:
    """(new global state, info): each ``lora_A`` replaced by its p-weighted mean; nothing else read."""
    p = normalise(weights)
    ids = list(client_ids) if client_ids is not None else list(range(len(client_states)))
    a_keys = [layer.a_key for layer in layers]
    check_uploads(client_states, a_keys, rule, ids)
    check_uploads([global_state, client_states[0]], a_keys, rule, ["the server", ids[0]])
    new = dict(global_state)
    new.update(mean_of_keys(client_states, p, a_keys))
    return new, {}


@register_rule("fedsa")
class FedSALoRA(LoRARule):
    """FedSA-LoRA: global A, personal B and head (see the module docstring for what travels).

    Args:
        weighting: ``samples`` (p_i = n_i / sum n) or ``uniform``.
    """

    personalised = True

    def personal_keys(self, state: ServerState) -> list[str]:
        """B and the head: what each client keeps."""
        return [layer.b_key for layer in self.layers(state)] + list(state["head_keys"])

    def shared_keys(self, state: ServerState) -> list[str]:
        return [layer.a_key for layer in self.layers(state)]

    def upload_keys(self, state: ServerState) -> frozenset[str]:
        return frozenset(self.shared_keys(state))

    def configure_client(self, state: ServerState, client_id: int, client_weights: StateDict | None) -> ClientPlan:
        self._state = state
        own = client_weights if client_weights is not None else state["global"]
        shared = {k: state["global"][k] for k in self.shared_keys(state)}
        weights = {**shared, **{k: own[k] for k in self.personal_keys(state)}}
        wire = sum(t.numel() * t.element_size() for t in shared.values())
        return ClientPlan(weights=weights, upload_keys=self.upload_keys(state),
                          keep_keys=frozenset(self.personal_keys(state)), wire_bytes=wire)

    def aggregate(self, state: ServerState, results: list[ClientResult], ctx: ServerContext) -> ServerState:
        ids = [r.client_id for r in results]
        states = [r.weights for r in results]
        p = self.client_weights(results)
        new, _ = fedsa_aggregate(state["global"], states, p, self.layers(state), ids, self.rule_name)
        personal = self.personal_keys(state)
        kept = [r.kept for r in results]
        check_uploads(kept, personal, self.rule_name, ids)
        view = mean_of_keys(kept, normalise(p), personal)
        return {**state, "global": new, "server_view": view, "round": state["round"] + 1}

    def sync(self, state: ServerState, results: list[ClientResult], ctx: ServerContext) -> dict[int, StateDict]:
        """Each client: the new global A with its own B and head, untouched by the server."""
        shared = {k: state["global"][k] for k in self.shared_keys(state)}
        personal = self.personal_keys(state)
        return {r.client_id: {**shared, **{k: r.kept[k] for k in personal}} for r in results}

    def server_module(self, state: ServerState, ctx: ServerContext) -> nn.Module:
        """Evaluation only: global A with the round's mean B and head."""
        return ctx.load_network({**ctx.client_template(), **state["global"], **state.get("server_view", {})})
