"""FedAvg (McMahan et al., 2017): the sample-weighted mean of the clients' weights."""

from __future__ import annotations

from fedmoe.algorithms.base import Algorithm, ClientResult, ServerContext, ServerState, StateDict
from fedmoe.algorithms.fusion import weighted_average


class FedAvg(Algorithm):
    """w <- sum_c (n_c / sum n) w_c over the round's clients (floating tensors only)."""

    def init_server(self, template: StateDict, ctx: ServerContext) -> ServerState:
        return {"global": {k: v.clone() for k, v in template.items()}}

    def aggregate(self, state: ServerState, results: list[ClientResult], ctx: ServerContext) -> ServerState:
        new = weighted_average(
            [r.weights for r in results], [r.num_samples for r in results], base=state["global"]
        )
        return {**state, "global": new}
