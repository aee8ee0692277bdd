"""The Flower ``ClientApp``: a node trains its client with the engine's own client step.

A node holds one federated client, the one whose id is its ``partition-id`` (``--node-config
"partition-id=3"`` on ``flower-supernode``; Flower's simulation numbers its virtual nodes 0..N-1).
It builds the job from the run's config once per process, then, for each ``train`` message, runs
the :class:`fedmoe.executors.Sequential` executor's client step on the plan it received: the same
local training, the same per-(seed, round, client) random numbers, the same upload as in a
single-process run. A persistent optimizer's state stays on the node (``Context.state``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmoe.errors import ConfigError
from fedmoe.executors import ClientTask, Sequential
from fedmoe.executors.base import ClientFailure
from fedmoe.federation.context import EngineContext
from fedmoe.federation.job import FederatedJob, build_job_from_text
from fedmoe.flower.records import content_to_plan, record_to_state, result_to_content

#: run_config key holding the job's resolved YAML config (see :mod:`fedmoe.flower.app`).
CONFIG_KEY = "fedmoe-config"
#: run_config key: torch threads per client process (0: leave torch's default).
THREADS_KEY = "client-threads"
#: node_config keys.
PARTITION_KEY = "partition-id"
DATA_DIR_KEY = "data-dir"
_STATE = "fedmoe-client"


@dataclass
class ClientSide:
    """One process's job, executor and evaluation context, reused across messages of a run."""

    job: FederatedJob
    executor: Sequential
    ctx: EngineContext


_SIDES: dict[tuple, ClientSide] = {}


def client_side(config_yaml: str, overrides: Sequence[str] = (), data_dir: str | None = None) -> ClientSide:
    """The cached job and bound executor of this process for a config (built on first use). The
    parameters the algorithm never trains are frozen, as the engine's loop does before round 1."""
    key = (config_yaml, tuple(overrides), data_dir)
    side = _SIDES.get(key)
    if side is None:
        job = build_job_from_text(config_yaml, overrides, data_dir)
        net = job.module.net
        template = {k: v.detach().clone() for k, v in net.state_dict().items()}
        ctx = EngineContext(job.module, job.datamodule, job.settings, template)
        frozen = job.federation.algorithm.frozen_keys(ctx)
        for name, param in net.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        executor = Sequential()
        executor.bind(job.module, job.datamodule, job.settings)
        side = _SIDES[key] = ClientSide(job, executor, ctx)
    return side


def node_client_id(context: Context, num_clients: int | None = None) -> int:
    """The client a node holds: its ``partition-id`` (checked against ``num_clients`` if given)."""
    if PARTITION_KEY not in context.node_config:
        raise ConfigError(
            f"this SuperNode has no {PARTITION_KEY}: start it with --node-config \"{PARTITION_KEY}=<client id>\""
        )
    cid = context.node_config[PARTITION_KEY]
    bad = isinstance(cid, bool) or not isinstance(cid, int) or cid < 0
    if bad or (num_clients is not None and cid >= num_clients):
        within = f" (0..{num_clients - 1})" if num_clients is not None else ""
        raise ConfigError(
            f"node config {PARTITION_KEY}={cid!r} is not a client of the data{within}; fix --node-config on "
            "flower-supernode or data.num_clients"
        )
    return cid


def client_app(config_yaml: str | None = None, overrides: Sequence[str] = (), threads: int | None = None) -> ClientApp:
    """A ClientApp for a config; ``config_yaml`` None reads it from the run config (``flwr run``).

    Args:
        config_yaml: the job's YAML text.
        overrides: command-line style overrides of the config.
        threads: ``torch.set_num_threads`` in the client process (None: the run config's
            ``client-threads``, else torch's default).
    """
    app = ClientApp()

    def side_of(context: Context) -> ClientSide:
        text = config_yaml if config_yaml is not None else context.run_config.get(CONFIG_KEY)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"the run config has no {CONFIG_KEY}: run an app written by python -m fedmoe.flower app")
        n = threads if threads is not None else int(context.run_config.get(THREADS_KEY, 0) or 0)
        if n > 0 and torch.get_num_threads() != n:
            torch.set_num_threads(n)
        data_dir = context.node_config.get(DATA_DIR_KEY)
        return client_side(text, overrides, str(data_dir) if data_dir is not None else None)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        """Which client this node holds (its ``partition-id``; the server checks it against the data).
        Answered without building the job: a deployed node starts a process per message."""
        reply = ConfigRecord({"client-id": node_client_id(context)})
        return Message(RecordDict({"node": reply}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        """Local training of the plan received; the reply carries the client's result."""
        side = side_of(context)
        plan, task = content_to_plan(message.content)
        cid = int(task["client-id"])
        held = node_client_id(context, side.job.num_clients)
        if cid != held:
            raise ConfigError(f"this node holds client {held}, not client {cid}")
        keep = bool(task.get("keep-optimizer", False))
        optimizer_state = _load_optimizer(context, cid) if keep else None
        outcome = side.executor.run([ClientTask(cid, plan, optimizer_state, keep_optimizer=keep,
                                                round=int(task["round"]), seed=int(task["seed"]))])[0]
        if isinstance(outcome, ClientFailure):
            raise RuntimeError(f"client {cid}: {outcome.error}")
        if keep:
            _save_optimizer(context, cid, outcome.optimizer_state)
        return Message(result_to_content(outcome.result), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        """The synced model received, on this client's held-out split."""
        side = side_of(context)
        cid = node_client_id(context, side.job.num_clients)
        weights = record_to_state(message.content["weights"])
        dataset = side.job.datamodule.splits.client_test[cid]
        metrics = side.ctx.evaluate(side.ctx.load_network(weights), dataset) if len(dataset) else {}
        record = MetricRecord({k: float(v) for k, v in metrics.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)})
        record["client-id"] = cid
        return Message(RecordDict({"metrics": record}), reply_to=message)

    return app


def _load_optimizer(context: Context, cid: int) -> dict | None:
    record = context.state.get(_STATE)
    data = record.get(f"optimizer-{cid}") if record is not None else None
    return torch.load(io.BytesIO(data), weights_only=True) if data else None


def _save_optimizer(context: Context, cid: int, state: dict | None) -> None:
    if state is None:
        return
    buf = io.BytesIO()
    torch.save(state, buf)
    record = context.state.get(_STATE)
    if record is None:
        record = context.state[_STATE] = ConfigRecord()
    record[f"optimizer-{cid}"] = buf.getvalue()

