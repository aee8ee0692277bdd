"""Helpers for the Flower tests: tiny digits configs, the sequential executor's result for a
config, and a loopback grid that hands the strategy's messages to a ClientApp in this process."""

from __future__ import annotations

import os
from pathlib import Path
from uuid import uuid4

import pytest
import torch
import yaml

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402


def write_config(folder: Path, algorithm: dict | None = None, clients: int = 2, per_round: int = 2, rounds: int = 2,
                 optimizer: str = "torch.optim.SGD", lr: float = 0.05, **federation) -> Path:
    """A digits job (digits_cnn, batch 32, 1 local epoch, two batches per fit) with nothing
    evaluated, saved or logged unless asked."""
    config = {
        "seed_everything": 3,
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "default_root_dir": str(folder / "run"),
                    "enable_progress_bar": False},
        "model": {"network": "digits_cnn", "num_classes": 10,
                  "optimizer": {"class_path": optimizer, "init_args": {"lr": lr}}},
        "data": {"class_path": "fedmoe.data.digits.DigitsDataModule",
                 "init_args": {"num_clients": clients, "batch_size": 32}},
        "federation": {
            "rounds": rounds, "clients_per_round": per_round,
            "algorithm": algorithm or {"class_path": "fedmoe.algorithms.fedavg.FedAvg"},
            "eval_every": None, "eval_last": False, "client_eval": False, "checkpoint_every": None,
            "checkpoint_last": False, "write_logs": False, "progress": False, **federation,
        },
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sequential_run(config: Path):
    """The engine's own loop with the sequential executor on a config (one torch thread)."""
    from fedmoe.federation.loop import FederatedLoop
    from fedmoe.federation.job import build_job

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        job = build_job(config)
        loop = FederatedLoop(job.federation, job.module, job.datamodule, settings=job.settings,
                             run_dir=job.run_dir, seed=job.seed)
        loop.fit()
    finally:
        torch.set_num_threads(threads)
    return loop


class LoopbackGrid(Grid):
    """Delivers each message to a ClientApp in this process, one node per partition id; the
    client's own random numbers never touch the server's global RNG."""

    def __init__(self, app, partitions: list[int], fail: set[int] = frozenset()) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # who sends: the ServerApp
        self.app = app
        self.node_of = {p: 1000 + p for p in partitions}
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={"partition-id": p}, state=RecordDict(),
                                    run_config={}) for p, n in self.node_of.items()}
        self.fail = {self.node_of[p] for p in fail}
        self.sent: list[Message] = []

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            with torch.random.fork_rng(devices=[]):
                try:
                    if node in self.fail and msg.metadata.message_type == "train":
                        raise RuntimeError("node lost")
                    reply = self.app(msg, self.contexts[node])
                except Exception as e:  # what a SuperNode sends back for a failing ClientApp
                    reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            replies.append(reply)
        return replies


class _Helpers:
    write_config = staticmethod(write_config)
    sequential_run = staticmethod(sequential_run)
    LoopbackGrid = LoopbackGrid


@pytest.fixture
def fl() -> type[_Helpers]:
    """The helpers above (a test module cannot import this conftest by name)."""
    return _Helpers
