"""FedIT (Zhang et al., 2024): the weighted means of A and of B.

A <- sum_i p_i A_i, B <- sum_i p_i B_i. Inexact: the aggregate's update s B_bar A_bar misses
s sum_i p_i B_i A_i by s sum_i p_i (B_i - B_bar)(A_i - A_bar). Down: every adapter tensor and the
head; up: the same.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from fedmoe.algorithms.base import ClientResult, ServerContext, ServerState
from fedmoe.algorithms.lora.common import StateDict, check_uploads, mean_of_keys, normalise
from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.algorithms.lora.rules import LoRARule, register_rule


def mean_keys(global_state: Mapping[str, torch.Tensor], layers: Sequence[LoRALayer]) -> list[str]:
    """The keys FedIT averages: every key of the global state but the adapted layers' base weights."""
    bases = {layer.base_key for layer in layers}
    return [k for k in global_state if k not in bases]


def fedit_aggregate(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    layers: Sequence[LoRALayer],
    client_ids: Sequence[int] | None = None,
    rule: str = "fedit",
) -> tuple[StateDict, dict[str, Any]]:
    """(new global state, info): A, B and the head replaced by their p-weighted means.

    Keys of ``global_state`` that clients do not upload (base weights) are kept as they are.
    """
    p = normalise(weights)
    keys = mean_keys(global_state, layers)
    check_uploads(client_states, keys, rule, client_ids)
    check_uploads([global_state, client_states[0]], keys, rule, ["the server", (client_ids or [0])[0]])
    new = dict(global_state)
    new.update(mean_of_keys(client_states, p, keys))
    return new, {}


@register_rule("fedit")
class FedIT(LoRARule):
    """FedIT: weighted means of A, B and the head (inexact; see the module docstring).

    Args:
        weighting: ``samples`` (p_i = n_i / sum n) or ``uniform``.
    """

    def aggregate(self, state: ServerState, results: list[ClientResult], ctx: ServerContext) -> ServerState:
        new, _ = fedit_aggregate(
            state["global"], [r.weights for r in results], self.client_weights(results), self.layers(state),
            [r.client_id for r in results], self.rule_name,
        )
        return {**state, "global": new, "round": state["round"] + 1}
