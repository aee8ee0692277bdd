"""Algorithms that send and receive only part of the network (adapter rules): partial loads,
filtered uploads, wire bytes, frozen keys, and the data set's monitored metric."""

import math

import pytest
import torch

from fedmoe.algorithms.base import ClientPlan, ClientResult
from fedmoe.algorithms.fedavg import FedAvg
from fedmoe.algorithms.fusion import num_bytes, weighted_average
from fedmoe.data.digits import DigitsDataModule
from fedmoe.federation.context import load_weights
from fedmoe.federation.loop import FederatedLoop, Federation
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier


class HeadOnly(FedAvg):
    """Trains every layer but federates only the output layer; the first conv layer is frozen."""

    seen: list[set[str]]

    def init_server(self, template, ctx):
        self.keys = frozenset(k for k in template if k.startswith("classifier.3."))
        self.seen = []
        return {"global": {k: template[k].clone() for k in self.keys}}

    def frozen_keys(self, ctx):
        return {"features.0.weight", "features.0.bias"}

    def configure_client(self, state, client_id, client_weights):
        return ClientPlan(weights=state["global"], upload_keys=self.keys, wire_bytes=7)

    def upload_bytes(self, result: ClientResult) -> int:
        self.seen.append(set(result.weights))
        return 5

    def aggregate(self, state, results, ctx):
        new = weighted_average([r.weights for r in results], [r.num_samples for r in results])
        return {**state, "global": new}


def test_partial_plans_upload_only_their_keys_and_bytes_come_from_the_algorithm(tmp_path):
    torch.manual_seed(0)
    module = Classifier("digits_cnn", 10)
    conv1 = module.net.features[0].weight.detach().clone()
    algo = HeadOnly()
    loop = FederatedLoop(Federation(algorithm=algo, rounds=1, clients_per_round=2, progress=False), module,
                         DigitsDataModule(num_clients=4), RunnerSettings(max_epochs=1), run_dir=tmp_path / "run")
    loop.fit()
    row = loop.history[-1]
    assert row["comm/bytes_down"] == 2 * 7 and row["comm/bytes_up"] == 2 * 5
    assert algo.seen == [set(algo.keys)] * 2
    assert torch.equal(module.net.features[0].weight, conv1), "a frozen key was trained"
    assert not module.net.features[0].weight.requires_grad
    assert "features.0.weight" in loop.ctx.trainable_keys()


def test_partial_load_keeps_other_keys_and_refuses_unknown_ones():
    torch.manual_seed(0)
    net = Classifier("digits_cnn", 10).net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    load_weights(net, {"classifier.3.bias": torch.ones(10)})
    after = net.state_dict()
    assert torch.equal(after["classifier.3.bias"], torch.ones(10))
    assert all(torch.equal(after[k], before[k]) for k in before if k != "classifier.3.bias")
    with pytest.raises(KeyError, match="nope"):
        load_weights(net, {"nope": torch.ones(1)})


class AccuracyMonitored(DigitsDataModule):
    """Digits whose best round is picked by validation accuracy, with one extra metric."""

    monitor = ("acc", "max")

    def metrics(self, outputs, targets):
        out = super().metrics(outputs, targets)
        out["err"] = 1 - out["acc"]
        return out


def test_best_round_follows_the_monitored_metric_and_extra_metrics_are_logged(tmp_path):
    torch.manual_seed(0)
    module = Classifier("digits_cnn", 10, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    loop = FederatedLoop(Federation(algorithm=FedAvg(), rounds=3, clients_per_round=3, progress=False), module,
                         AccuracyMonitored(num_clients=6), RunnerSettings(max_epochs=1), run_dir=tmp_path / "run")
    loop.fit()
    val_acc = [row["server/val_acc"] for row in loop.history]
    best = max(range(3), key=lambda i: (val_acc[i], -i))
    assert loop.best["round"] == best + 1
    assert loop.best["test_acc"] == loop.history[best]["server/test_acc"]
    row = loop.history[-1]
    assert math.isclose(row["server/test_err"], 1 - row["server/test_acc"])
    assert row["server/best_test_acc"] == loop.history[best]["server/test_acc"]
    assert num_bytes(loop.template) > 0
