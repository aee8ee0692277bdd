"""Clients one after another in this process, with one reused module and one Fabric."""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from fedmoe.algorithms.base import ClientResult
from fedmoe.executors.base import ClientFailure, ClientOutcome, ClientTask, Executor, client_rng
from fedmoe.federation.context import load_weights
from fedmoe.federation.runner import LocalRunner

log = logging.getLogger(__name__)


class Sequential(Executor):
    """The reference executor: deterministic on CPU, cheapest per client.

    Args:
        progress: show a progress bar over the round's clients.
    """

    multi_device_clients = True
    """Under a multi-device ``trainer.strategy`` each client's fit runs on all of ``trainer.devices``."""

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress

    def bind(self, module, datamodule, settings) -> None:
        super().bind(module, datamodule, settings)
        self.runner = LocalRunner(settings, distribute_fits=True)

    def run(self, tasks: list[ClientTask]) -> list[ClientOutcome | ClientFailure]:
        out: list[ClientOutcome | ClientFailure] = []
        for task in tqdm(tasks, desc="clients", leave=False, disable=not self.progress):
            try:
                out.append(self._train(task))
            except Exception as e:  # a failing client is dropped, never the round
                log.warning("client %d failed: %s: %s", task.client_id, type(e).__name__, e)
                out.append(ClientFailure(task.client_id, f"{type(e).__name__}: {e}"))
        return out

    def _train(self, task: ClientTask) -> ClientOutcome:
        net = self.module.net
        load_weights(net, task.plan.weights)
        dataset = self.datamodule.splits.client_train[task.client_id]
        with client_rng(task, self.runner.device):
            fit = self.runner.fit(
                self.module,
                self.datamodule.client_train_loader(task.client_id, task.round, task.seed),
                regularizer=task.plan.regularizer,
                optimizer_state=task.optimizer_state,
                return_optimizer_state=task.keep_optimizer,
            )
        upload, keep = task.plan.upload_keys, task.plan.keep_keys
        state = net.state_dict()
        weights = {k: v.detach().to("cpu", copy=True) for k, v in state.items() if upload is None or k in upload}
        kept = {k: state[k].detach().to("cpu", copy=True) for k in keep}
        result = ClientResult(
            client_id=task.client_id,
            num_samples=len(dataset),
            weights=weights,
            metrics={"loss": fit.loss, "steps": fit.steps},
            kept=kept,
        )
        return ClientOutcome(result=result, optimizer_state=fit.optimizer_state)
