"""A client's batches and local result depend on (seed, round, client id) alone, not on which
clients trained before it; data modules may give only client training data; the last round's
evaluation, checkpoint and files can be switched off."""

import pytest
import torch
from torch import nn

from fedmoe.algorithms.base import ClientPlan
from fedmoe.data.digits import DigitsDataModule
from fedmoe.data.federated import ArrayDataset, FederatedDataModule, FederatedSplits
from fedmoe.data.transforms import RandomHorizontalFlip
from fedmoe.errors import DataError
from fedmoe.executors import ClientTask, Sequential
from fedmoe.federation.loop import FederatedLoop, Federation
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier
from fedmoe.models.networks import NETWORKS, register_network


class DropoutMLP(nn.Module):
    """A digits MLP with dropout: its training draws from torch's global RNG."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.body(x)


if "test_dropout_mlp" not in NETWORKS:
    register_network("test_dropout_mlp")(DropoutMLP)


class FlippedDigits(DigitsDataModule):
    """Digits whose client training sets flip images at random (augmentation from the global RNG)."""

    def build(self):
        splits = super().build()
        splits.client_train = [d.with_transform(RandomHorizontalFlip(0.5)) for d in splits.client_train]
        return splits


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_client_batches_depend_on_seed_round_and_client_alone():
    dm = FlippedDigits(num_clients=4, batch_size=16)
    dm.setup()
    torch.manual_seed(0)
    alone = _batches(dm.client_train_loader(2, round=3, seed=7))
    torch.manual_seed(123)
    _batches(dm.client_train_loader(0, round=3, seed=7))
    torch.rand(5)
    after = _batches(dm.client_train_loader(2, round=3, seed=7))
    assert _same_batches(alone, after)
    assert not _same_batches(alone, _batches(dm.client_train_loader(2, round=4, seed=7)))
    assert not _same_batches(alone, _batches(dm.client_train_loader(2, round=3, seed=8)))
    flipped = [x for x, _ in alone]
    plain = dm.splits.client_train[2].with_transform(None)
    assert any(not torch.equal(x, plain.x[plain.index][: len(x)]) for x in flipped)


def test_client_loader_leaves_the_global_rng_alone():
    dm = FlippedDigits(num_clients=4, batch_size=16)
    dm.setup()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _batches(dm.client_train_loader(1, round=1, seed=0))
    assert torch.equal(torch.rand(3), expected)


def _bound_executor(network: str, dm: FederatedDataModule) -> tuple[Sequential, Classifier]:
    torch.manual_seed(0)
    module = Classifier(network, 10, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    executor = Sequential()
    dm.setup()
    executor.bind(module, dm, RunnerSettings(max_epochs=1))
    return executor, module


@pytest.mark.parametrize("network", ["digits_cnn", "test_dropout_mlp"])
def test_client_result_is_the_same_alone_or_after_other_clients(network):
    dm = FlippedDigits(num_clients=4, batch_size=16)
    executor, module = _bound_executor(network, dm)
    start = {k: v.clone() for k, v in module.net.state_dict().items()}

    def task(cid):
        return ClientTask(cid, ClientPlan(weights=start), round=2, seed=11)

    torch.manual_seed(1)
    alone = executor.run([task(3)])[0].result
    torch.manual_seed(2)
    after = executor.run([task(0), task(1), task(3)])[2].result
    assert alone.client_id == after.client_id == 3
    for key, value in alone.weights.items():
        assert torch.equal(value, after.weights[key]), key
    assert alone.metrics == after.metrics
    other_round = executor.run([ClientTask(3, ClientPlan(weights=start), round=3, seed=11)])[0].result
    assert any(not torch.equal(v, other_round.weights[k]) for k, v in alone.weights.items())


class OnlyClientData(FederatedDataModule):
    """A data module that gives client training data and nothing else."""

    def build(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(60, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (60,), generator=g)
        y[0] = 9
        return FederatedSplits(client_train=[ArrayDataset(x, y, torch.arange(i, 60, 3)) for i in range(3)])


def _loop(tmp_path, dm, **fed):
    torch.manual_seed(0)
    module = Classifier("digits_cnn", 10, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    return FederatedLoop(Federation(progress=False, **fed), module, dm, RunnerSettings(max_epochs=1),
                         run_dir=tmp_path / "run", seed=0)


def test_data_module_may_give_only_client_training_data(tmp_path):
    dm = OnlyClientData(num_clients=3, batch_size=8)
    loop = _loop(tmp_path, dm, rounds=2, clients_per_round=2)
    loop.fit()
    assert dm.splits.num_classes == 10
    assert len(dm.splits.client_test) == 3 and all(len(d) == 0 for d in dm.splits.client_test)
    assert len(loop.history) == 2 and loop.history[-1]["clients/ok"] == 2


def test_splits_without_labels_or_with_unmatched_held_out_sets_are_data_errors():
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(DataError, match="num_classes is not given"):
        FederatedSplits(client_train=[ArrayDataset(x, torch.zeros(4))])
    with pytest.raises(DataError, match="2 client_train sets but 1 client_test"):
        FederatedSplits(client_train=[ArrayDataset(x, torch.zeros(4, dtype=torch.long))] * 2,
                        client_test=[ArrayDataset(x, torch.zeros(4, dtype=torch.long))])


def test_last_round_evaluation_checkpoint_and_files_can_be_switched_off(tmp_path):
    loop = _loop(tmp_path, DigitsDataModule(num_clients=4), rounds=2, clients_per_round=2, eval_every=None,
                 eval_last=False, client_eval=False, checkpoint_every=None, checkpoint_last=False, write_logs=False)
    summary = loop.fit(config_yaml="x: 1\n")
    assert summary["rounds"] == 2 and len(loop.history) == 2
    assert not any(k.startswith("server/") for row in loop.history for k in row)
    assert not (tmp_path / "run").exists()


def test_defaults_still_evaluate_and_checkpoint_the_last_round(tmp_path):
    loop = _loop(tmp_path, DigitsDataModule(num_clients=4), rounds=2, clients_per_round=2, eval_every=5,
                 checkpoint_every=5, client_eval=False)
    loop.fit()
    assert "server/test_acc" in loop.history[-1] and "server/test_acc" not in loop.history[0]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "metrics.csv").is_file()
