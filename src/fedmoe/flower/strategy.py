"""A Flower ``Strategy`` (Message API) that drives a fedmoe :class:`Algorithm` unchanged.

Each round it samples the clients as the engine's loop does (:class:`ClientSampler`, same seed),
asks the algorithm for each client's plan (the global weights, FedProx's regulariser, Fed-MoE's
synced model from Stage C, an adapter rule's subset of keys), sends each plan to the node holding
that client, turns the replies back into :class:`ClientResult` objects in the sampled order, drops
failed and non-finite clients (``min_clients``, as the engine), and calls the algorithm's
``aggregate`` and ``sync``. Personalised client state lives in a :class:`ClientStore` on the server,
as in the engine. Server-side evaluation is Flower's ``evaluate_fn``; per-client evaluation of the
synced models, Flower's evaluate messages.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmoe.algorithms.base import Algorithm, ClientResult, ServerContext, StateDict
from fedmoe.algorithms.fusion import all_finite, num_bytes
from fedmoe.errors import ConfigError, RoundError
from fedmoe.federation.sampling import ClientSampler
from fedmoe.federation.store import ClientStore
from fedmoe.flower.records import content_to_result, plan_to_content, state_to_record

log = logging.getLogger(__name__)


class AlgorithmStrategy(Strategy):
    """Rounds of a fedmoe algorithm over a Flower grid.

    Args:
        algorithm: the federated algorithm (its objects are used as they are).
        ctx: the server's compute and data (:class:`fedmoe.federation.context.EngineContext`).
        template: the common initial client weights.
        num_clients: N, the clients of the data (client ids 0..N-1).
        clients_per_round: m.
        sampling: ``uniform`` or ``per_group``, as ``federation.sampling``.
        seed: the run's seed (client sampling; the clients' random numbers).
        min_clients: clients that must survive a round.
        store_dtype: dtype of stored personal weights (None: lossless).
        store_root: folder of a disk-backed client store (one safetensors file per client, the
            current round's only; None: in memory), as ``federation.client_store: disk``.
        persistent_optimizer: clients keep their optimizer state between their rounds (on the node).
        evaluate_every: evaluate the server model every this many rounds (None: only the last if
            ``evaluate_last``).
        evaluate_last: evaluate the server model after the last round.
        client_eval: each participating node evaluates its synced model on its held-out split.
        rounds: the run's number of rounds (for ``evaluate_last``).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        ctx: ServerContext,
        template: StateDict,
        num_clients: int,
        clients_per_round: int,
        sampling: str = "uniform",
        seed: int = 0,
        min_clients: int = 1,
        store_dtype: str | None = None,
        store_root: str | Path | None = None,
        persistent_optimizer: bool = False,
        evaluate_every: int | None = None,
        evaluate_last: bool = True,
        client_eval: bool = False,
        rounds: int = 1,
    ) -> None:
        self.algo = algorithm
        self.ctx = ctx
        self.template = template
        self.sampler = ClientSampler(num_clients, clients_per_round, sampling, seed)
        self.num_clients = num_clients
        self.seed = seed
        self.min_clients = min_clients
        self.persistent_optimizer = persistent_optimizer
        self.evaluate_every = evaluate_every
        self.evaluate_last = evaluate_last
        self.client_eval = client_eval
        self.rounds = rounds
        self.store = ClientStore(store_dtype, root=store_root)
        self.state: dict[str, Any] = algorithm.init_server(template, ctx)
        self.nodes: dict[int, int] = {}
        """Client id -> the Flower node holding it (filled by :meth:`connect`)."""
        self.history: list[dict[str, Any]] = []
        self._round: dict[str, Any] = {}
        self._synced: dict[int, StateDict] = {}

    # -- nodes ------------------------------------------------------------------------------------

    def connect(self, grid: Grid, timeout: float = 120.0, poll: float = 0.5) -> dict[int, int]:
        """Ask every node which client it holds, until every client has a node or ``timeout``
        seconds have passed (then a :class:`ConfigError` names the clients without one)."""
        deadline = time.monotonic() + timeout
        asked: set[int] = set()
        while True:
            new = [n for n in grid.get_node_ids() if n not in asked]
            if new:
                asked.update(new)
                queries = [Message(RecordDict({"task": ConfigRecord({"ask": "client-id"})}), n, MessageType.QUERY)
                           for n in new]
                for reply in grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic())):
                    node = reply.metadata.src_node_id
                    if reply.has_error():
                        raise ConfigError(f"node {node} cannot serve this run: {reply.error.reason.strip()}")
                    cid = int(reply.content["node"]["client-id"])
                    if not 0 <= cid < self.num_clients:
                        raise ConfigError(
                            f"node {node} has partition-id={cid}, which is not a client of the data "
                            f"(0..{self.num_clients - 1}); fix --node-config on its flower-supernode or data.num_clients"
                        )
                    if cid in self.nodes and self.nodes[cid] != node:
                        raise ConfigError(f"nodes {self.nodes[cid]} and {node} both hold client {cid} (partition-id)")
                    self.nodes[cid] = node
            if len(self.nodes) == self.num_clients:
                return dict(self.nodes)
            if time.monotonic() >= deadline:
                missing = sorted(set(range(self.num_clients)) - set(self.nodes))
                shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
                raise ConfigError(
                    f"after {timeout:.0f} s, {len(missing)} of {self.num_clients} clients have no SuperNode "
                    f"(partition-id {shown}); start one flower-supernode per client"
                )
            time.sleep(poll)

    # -- training ---------------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One message per sampled client, carrying the algorithm's plan for it."""
        ids = self.sampler.sample(server_round)
        messages, bytes_down, missing = [], 0, []
        for cid in ids:
            if cid not in self.nodes:
                missing.append(cid)
                continue
            own = self.store.get_weights(cid) if self.algo.personalised else None
            plan = self.algo.configure_client(self.state, cid, own if own is not None else self.template)
            if plan.transmit:
                bytes_down += num_bytes(plan.weights) if plan.wire_bytes is None else plan.wire_bytes
            content = plan_to_content(plan, cid, server_round, self.seed, self.persistent_optimizer)
            messages.append(Message(content, self.nodes[cid], MessageType.TRAIN, group_id=str(server_round)))
        self._round = {"ids": ids, "t0": time.perf_counter(), "bytes_down": bytes_down, "missing": missing}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The algorithm's aggregate and sync of the round's surviving clients, in sampled order."""
        ids = self._round["ids"]
        by_client: dict[int, ClientResult] = {}
        failed: dict[int, str] = {cid: "no node" for cid in self._round["missing"]}
        node_client = {node: cid for cid, node in self.nodes.items()}
        for reply in replies:
            cid = node_client.get(reply.metadata.src_node_id)
            if cid is None:
                continue
            if reply.has_error():
                reason = (reply.error.reason or "").strip().splitlines()
                failed[cid] = reason[-1] if reason else "error"
                continue
            result = content_to_result(reply.content)
            if not all_finite(result.weights):
                log.warning("round %d: client %d returned non-finite weights; dropped", server_round, cid)
                failed[cid] = "non-finite weights"
                continue
            by_client[cid] = result
        for cid in ids:
            if cid not in by_client and cid not in failed:
                failed[cid] = "no reply"
        dropped = [f"{cid} ({why})" for cid, why in sorted(failed.items())]
        results = [by_client[cid] for cid in ids if cid in by_client]
        if dropped:
            log.warning("round %d: dropped clients %s", server_round, "; ".join(dropped))
        if len(results) < self.min_clients:
            raise RoundError(
                f"round {server_round}: only {len(results)} of {len(ids)} clients survived (federation.min_clients="
                f"{self.min_clients}); dropped: {'; '.join(dropped)}"
            )
        bytes_up = sum(self.algo.upload_bytes(r) for r in results)
        self.state = self.algo.aggregate(self.state, results, self.ctx)
        synced = self.algo.sync(self.state, results, self.ctx)
        bytes_down = self._round["bytes_down"]
        if self.algo.sync_transmits:
            bytes_down += sum(num_bytes(w) for w in synced.values())
        if self.algo.personalised:
            for cid, w in synced.items():
                self.store.put_weights(cid, w, version=server_round)
            self.store.commit()
        self._synced = synced
        losses = [r.metrics.get("loss", math.nan) for r in results]
        finite = [x for x in losses if math.isfinite(x)]
        row = {
            "round": server_round,
            "clients": " ".join(map(str, ids)),
            "clients/ok": len(results),
            "clients/dropped": len(dropped),
            "clients/train_loss": sum(finite) / len(finite) if finite else math.nan,
            "comm/bytes_up": bytes_up,
            "comm/bytes_down": bytes_down,
            "time/round_s": time.perf_counter() - self._round["t0"],
        }
        self.history.append(row)
        metrics = MetricRecord({k: float(v) for k, v in row.items() if isinstance(v, (int, float))})
        arrays = state_to_record(self.state["global"]) if "global" in self.state else None
        return arrays, metrics

    # -- evaluation -------------------------------------------------------------------------------

    def evaluates(self, server_round: int) -> bool:
        """Whether the server model is evaluated after ``server_round`` (never before round 1)."""
        if server_round < 1:
            return False
        scheduled = self.evaluate_every is not None and server_round % self.evaluate_every == 0
        return scheduled or (self.evaluate_last and server_round == self.rounds)

    def evaluate_server(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: the algorithm's server model on the validation and test sets."""
        if not self.evaluates(server_round):
            return None
        server = self.algo.server_module(self.state, self.ctx)
        out: dict[str, float] = {}
        for split, dataset in (("val", self.ctx.val), ("test", self.ctx.test)):
            for key, value in self.ctx.evaluate(server, dataset).items():
                if key != "n" and isinstance(value, (int, float)):
                    out[f"server/{split}_{key}"] = float(value)
        if self.history and self.history[-1]["round"] == server_round:
            self.history[-1].update(out)
        return MetricRecord(out)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """With ``client_eval``: each participating node evaluates its synced model."""
        if not self.client_eval:
            return []
        messages = []
        for cid, weights in self._synced.items():
            if cid in self.nodes:
                content = RecordDict({"weights": state_to_record(weights),
                                      "task": ConfigRecord({"client-id": int(cid)})})
                messages.append(Message(content, self.nodes[cid], MessageType.EVALUATE, group_id=str(server_round)))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean, min and max of the clients' held-out accuracy."""
        accs = [float(r.content["metrics"]["acc"]) for r in replies
                if not r.has_error() and math.isfinite(float(r.content["metrics"].get("acc", math.nan)))]
        if not accs:
            return None
        out = {"clients/acc_mean": sum(accs) / len(accs), "clients/acc_min": min(accs), "clients/acc_max": max(accs)}
        if self.history and self.history[-1]["round"] == server_round:
            self.history[-1].update(out)
        return MetricRecord(out)

    def summary(self) -> None:
        log.info("fedmoe %s over %d clients, %d per round, seed %d", type(self.algo).__name__, self.num_clients,
                 self.sampler.per_round, self.seed)

    # -- results ----------------------------------------------------------------------------------

    def server_weights(self) -> StateDict:
        """The server's model: the global weights, or the server module's (Fed-MoE's mixture)."""
        if "global" in self.state:
            return self.state["global"]
        return {k: v.detach().clone() for k, v in self.algo.server_module(self.state, self.ctx).state_dict().items()}

    def initial_arrays(self) -> ArrayRecord:
        """What Flower's ``start`` is given (only logged: the plans carry the weights)."""
        return state_to_record(self.state["global"]) if "global" in self.state else ArrayRecord()


def weights_digest(weights: StateDict) -> str:
    """SHA-256 of a state dict's keys, dtypes, shapes and bytes (equal digests: bit-identical weights)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(weights):
        t = weights[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()
