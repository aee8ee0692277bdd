"""Seeded client sampling. Each round's draw depends only on (seed, round), so a resumed run
samples exactly the clients the uninterrupted run would have."""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedmoe.validation import check_choice, check_int


class ClientSampler:
    """Chooses the clients of each round.

    Args:
        num_clients: N.
        per_round: m, clients per round.
        mode: ``uniform`` (m of N without replacement) or ``per_group`` (one client from each residue
            class of the client id modulo m, as the Fed-MoE code does).
        seed: sampling seed.
    """

    def __init__(
        self, num_clients: int, per_round: int, mode: Literal["uniform", "per_group"] = "uniform", seed: int = 0
    ) -> None:
        check_int("federation.clients_per_round", per_round, 1, num_clients, hint=f"the data has {num_clients} clients")
        check_choice("federation.sampling", mode, ("uniform", "per_group"))
        self.num_clients, self.per_round, self.mode, self.seed = num_clients, per_round, mode, seed

    def sample(self, round_idx: int) -> list[int]:
        """Sorted client ids of round ``round_idx`` (1-based)."""
        rng = np.random.default_rng([self.seed, round_idx])
        if self.mode == "uniform":
            chosen = rng.choice(self.num_clients, size=self.per_round, replace=False)
        else:
            chosen = [rng.choice(np.arange(g, self.num_clients, self.per_round)) for g in range(self.per_round)]
        return sorted(int(c) for c in chosen)
