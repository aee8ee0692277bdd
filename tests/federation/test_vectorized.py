"""The vectorized executor against the sequential one (SGD and Adam, unequal clients, FEMNIST and
digits CNNs, FedProx, persistent optimizers), and what it refuses."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fedmoe.algorithms.base import ClientPlan
from fedmoe.algorithms.fedprox import ProximalTerm
from fedmoe.data.digits import DigitsDataModule
from fedmoe.data.femnist import FEMNISTDataModule
from fedmoe.errors import ConfigError
from fedmoe.executors import ClientTask, Sequential, build_executor
from fedmoe.executors.vectorized import Vectorized, _OptimizerSpec, rows_on
from fedmoe.federation.loop import FederatedLoop, Federation
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier
from fedmoe.models.networks import NETWORKS, register_network

#: Adam's g / (sqrt(v) + eps) turns summation-order differences of gradients near eps into
#: differences of up to ~lr / 10, so the end-to-end comparisons use eps 1e-6; the update rule itself is
#: compared with torch.optim at the default eps on identical gradients.
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, eps=1e-6, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, eps=1e-6),
}


class BatchNormNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.body(x)


class DropoutNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Dropout(0.1), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.body(x)


for _name, _cls in (("test_vec_batchnorm", BatchNormNet), ("test_vec_dropout", DropoutNet)):
    if _name not in NETWORKS:
        register_network(_name)(_cls)


def _module(network: str, optimizer: str, num_classes: int = 10, **kw) -> Classifier:
    torch.manual_seed(0)
    return Classifier(network, num_classes, optimizer=OPTIMIZERS[optimizer], **kw)


def _run(executor, network, optimizer, dm, settings, num_classes=10, rounds=1, regularize=False):
    """Results of ``rounds`` rounds of all clients from one start (optimizer states carried over)."""
    module = _module(network, optimizer, num_classes)
    dm.setup()
    executor.bind(module, dm, settings)
    start = {k: v.clone() for k, v in module.net.state_dict().items()}
    reg = ProximalTerm(start, 0.5) if regularize else None
    states = [None] * len(dm.splits.client_train)
    for r in range(1, rounds + 1):
        tasks = [ClientTask(c, ClientPlan(weights=start, regularizer=reg), states[c], keep_optimizer=True, round=r, seed=4)
                 for c in range(len(states))]
        outcomes = executor.run(tasks)
        states = [getattr(o, "optimizer_state", None) for o in outcomes]
    return outcomes


def _assert_close(seq, vec, atol):
    assert [o.result.client_id for o in seq] == [o.result.client_id for o in vec]
    for a, b in zip(seq, vec):
        assert a.result.num_samples == b.result.num_samples
        assert a.result.metrics["steps"] == b.result.metrics["steps"]
        assert a.result.metrics["loss"] == pytest.approx(b.result.metrics["loss"], rel=1e-4)
        assert a.result.weights.keys() == b.result.weights.keys()
        for key, value in a.result.weights.items():
            torch.testing.assert_close(b.result.weights[key], value, atol=atol, rtol=1e-4, msg=key)
        sa, sb = a.optimizer_state, b.optimizer_state
        assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
        for i, entry in sa["state"].items():
            assert entry.keys() == sb["state"][i].keys()
            for name, value in entry.items():
                torch.testing.assert_close(sb["state"][i][name], value, atol=atol, rtol=1e-3)


@pytest.mark.parametrize("compute", ["vmap", "loop"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_digits_cnn_matches_sequential_with_unequal_clients(optimizer, compute):
    dm = DigitsDataModule(num_clients=3, batch_size=32, min_client_size=10)
    settings = RunnerSettings(max_epochs=1)
    seq = _run(Sequential(), "digits_cnn", optimizer, dm, settings)
    vec = _run(Vectorized(compute=compute), "digits_cnn", optimizer, dm, settings)
    assert len({o.result.metrics["steps"] for o in seq}) > 1
    assert any(o.result.num_samples % 32 for o in seq)
    _assert_close(seq, vec, atol=1e-5)


def test_a_loader_over_moved_rows_draws_the_batches_of_the_clients_own_loader(tmp_path):
    """Same sampler and generator: the same order and augmentation draws as a fresh loader of the
    same client, round and seed, and nothing drawn from the global RNG."""
    _random_leaf(tmp_path, [40, 9])
    dm = FEMNISTDataModule(str(tmp_path), num_clients=2, writers_per_client=1, server_writers=0, probe_writers=0,
                           batch_size=8)
    dm.setup()
    expected = [(x.clone(), y.clone()) for x, y in dm.client_train_loader(0, 3, 7)]
    state = torch.get_rng_state()
    moved = rows_on(dm.client_train_loader(0, 3, 7), torch.device("cpu"), {})
    got = list(moved)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(got) == len(expected) == 5 and len(got[-1][1]) == 4
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_a_clients_batches_are_gathered_and_augmented_there_as_on_the_cpu(tmp_path):
    _random_leaf(tmp_path, [40, 9])
    dm = FEMNISTDataModule(str(tmp_path), num_clients=2, writers_per_client=1, server_writers=0, probe_writers=0,
                           batch_size=8)
    dm.setup()
    copies: dict = {}
    got = list(rows_on(dm.client_train_loader(0, 1, 0), torch.device("cuda", 0), copies))
    assert all(x.device.type == "cuda" for x, _ in got) and len(copies) == 2
    for (x, y), (ex, ey) in zip(got, dm.client_train_loader(0, 1, 0)):
        torch.testing.assert_close(x.cpu(), ex, atol=1e-5, rtol=1e-5)
        assert torch.equal(y.cpu(), ey)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_on_a_gpu_vmap_matches_sequential_with_unequal_clients(optimizer):
    dm = DigitsDataModule(num_clients=3, batch_size=32, min_client_size=10)
    settings = RunnerSettings(accelerator="cuda", max_epochs=1)
    seq = _run(Sequential(), "digits_cnn", optimizer, dm, settings)
    vec = _run(Vectorized(compute="vmap"), "digits_cnn", optimizer, dm, settings)
    assert all(t.device.type == "cpu" for o in vec for t in o.result.weights.values())
    _assert_close(seq, vec, atol=1e-4)


def _random_leaf(root: Path, sizes: list[int]) -> None:
    """LEAF JSON with random pixels: one train file of writers w0.. with ``sizes`` samples, and a test file."""
    g = torch.Generator().manual_seed(0)
    for split, counts in (("train", sizes), ("test", [2] * len(sizes))):
        users = {f"w{i}": {"x": torch.rand(n, 784, generator=g).tolist(), "y": torch.randint(0, 62, (n,), generator=g).tolist()}
                 for i, n in enumerate(counts)}
        (root / split).mkdir(parents=True)
        (root / split / f"all_data_0_niid_0_keep_0_{split}_9.json").write_text(
            json.dumps({"users": list(users), "num_samples": counts, "user_data": users}))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_femnist_cnn_matches_sequential_with_unequal_clients_and_augmentation(tmp_path, optimizer):
    _random_leaf(tmp_path, [6, 3, 20, 4, 2, 2])

    def dm():
        return FEMNISTDataModule(str(tmp_path), num_clients=2, writers_per_client=2, server_writers=1,
                                 probe_writers=1, batch_size=8, val_fraction=0.0)

    settings = RunnerSettings(max_epochs=1)
    seq = _run(Sequential(), "femnist_cnn", optimizer, dm(), settings, num_classes=62)
    vec = _run(Vectorized(compute="vmap"), "femnist_cnn", optimizer, dm(), settings, num_classes=62)
    assert [o.result.metrics["steps"] for o in seq] == [2, 3] and [o.result.num_samples for o in seq] == [9, 24]
    _assert_close(seq, vec, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95)),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1),
])
def test_optimizer_updates_equal_torch_optim_on_the_same_gradients(make):
    """Two clients, one resuming with 3 earlier steps (per-client step counts), the other fresh."""
    torch.manual_seed(0)
    ref = [nn.Linear(4, 3) for _ in range(2)]
    opts = [make(m.parameters()) for m in ref]
    for _ in range(3):
        ref[0].weight.grad, ref[0].bias.grad = torch.randn(3, 4), torch.randn(3)
        opts[0].step()
    module = Classifier("tests.federation.test_vectorized.TinyLinear", 3, optimizer=make)
    spec = _OptimizerSpec.from_module(module)
    keys = ["weight", "bias"]
    train = {k: torch.stack([dict(m.named_parameters())[k].detach().clone() for m in ref]) for k in keys}
    opt = spec.state_for([opts[0].state_dict(), None], train, keys)
    for _ in range(4):
        grads = {k: torch.randn_like(train[k]) for k in keys}
        for i, m in enumerate(ref):
            m.weight.grad, m.bias.grad = grads["weight"][i].clone(), grads["bias"][i].clone()
            opts[i].step()
        opt.step(keys, [train[k] for k in keys], [grads[k] for k in keys], slice(0, 2))
    _assert_rows_equal_torch_optim(ref, opts, train, opt)


@pytest.mark.parametrize("make, kernel", [
    (lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1), "_fused_adam_"),
    (lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95)), "_fused_adamw_"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1), "_fused_sgd_"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "_fused_sgd_"),
    (lambda p: torch.optim.SGD(p, lr=0.1), "_fused_sgd_"),
])
def test_clients_at_the_same_step_are_updated_by_one_fused_cpu_kernel_equal_to_torch_optim(make, kernel, monkeypatch):
    """Both clients fresh, so every update covers rows at one step count: torch's fused CPU kernel runs
    (once per step), also on non-contiguous gradients, and matches torch.optim's own update."""
    calls = []
    original = getattr(torch, kernel)
    monkeypatch.setattr(torch, kernel, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    torch.manual_seed(0)
    ref = [nn.Linear(4, 3) for _ in range(2)]
    opts = [make(m.parameters()) for m in ref]
    module = Classifier("tests.federation.test_vectorized.TinyLinear", 3, optimizer=make)
    keys = ["weight", "bias"]
    train = {k: torch.stack([dict(m.named_parameters())[k].detach().clone() for m in ref]) for k in keys}
    opt = _OptimizerSpec.from_module(module).state_for([None, None], train, keys)
    for _ in range(3):
        grads = {"weight": torch.randn(2, 4, 3).transpose(1, 2), "bias": torch.randn(2, 3)}
        for i, m in enumerate(ref):
            m.weight.grad, m.bias.grad = grads["weight"][i].clone(), grads["bias"][i].clone()
            opts[i].step()
        opt.step(keys, [train[k] for k in keys], [grads[k] for k in keys], slice(0, 2))
    assert len(calls) == 3
    _assert_rows_equal_torch_optim(ref, opts, train, opt)


def _assert_rows_equal_torch_optim(ref: list[nn.Module], opts: list, train: dict, opt) -> None:
    """Each client's row of the stacked weights and optimizer state equals its torch.optim twin."""
    for i, m in enumerate(ref):
        torch.testing.assert_close(train["weight"][i], m.weight.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(train["bias"][i], m.bias.detach(), atol=1e-6, rtol=1e-6)
        saved = opt.client_state(i, pin=False)["state"]
        for j, entry in opts[i].state_dict()["state"].items():
            for name, value in entry.items():
                torch.testing.assert_close(saved[j][name], value, atol=1e-6, rtol=1e-6)


class TinyLinear(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, 4))
        self.bias = nn.Parameter(torch.zeros(num_classes))


@pytest.mark.parametrize("optimizer, compute", [("sgd", "vmap"), ("adamw", "vmap"), ("adamw", "loop")])
def test_fedprox_clipping_and_persistent_optimizers_match_sequential(optimizer, compute):
    dm = DigitsDataModule(num_clients=3, batch_size=16, min_client_size=10)
    settings = RunnerSettings(max_epochs=1, limit_train_batches=3, gradient_clip_val=0.5)
    seq = _run(Sequential(), "digits_cnn", optimizer, dm, settings, rounds=2, regularize=True)
    vec = _run(Vectorized(chunk_size=2, compute=compute), "digits_cnn", optimizer, dm, settings, rounds=2,
               regularize=True)
    _assert_close(seq, vec, atol=1e-5)


@pytest.mark.parametrize("compute, chunk_size, stacked", [("loop", None, 1), ("loop", 2, 2), ("vmap", None, 4)])
def test_loop_mode_stacks_one_client_at_a_time_unless_given_a_chunk_size(compute, chunk_size, stacked):
    """The loop trains one client after another, so by default it holds one client's weights and
    optimizer state, not the round's; vmap stacks the whole round."""
    dm = DigitsDataModule(num_clients=4, batch_size=32)
    settings = RunnerSettings(max_epochs=1, limit_train_batches=1)
    executor = Vectorized(chunk_size=chunk_size, compute=compute)
    outcomes = _run(executor, "digits_cnn", "adam", dm, settings)
    assert [o.result.metrics["steps"] for o in outcomes] == [1, 1, 1, 1]
    assert executor._pool.tensors and {t.shape[0] for t in executor._pool.tensors.values()} == {stacked}


def test_federated_rounds_with_vectorized_clients_match_sequential(tmp_path):
    def loop(executor):
        module = _module("digits_cnn", "sgd")
        fed = Federation(rounds=2, clients_per_round=3, executor=executor, eval_every=None, eval_last=False,
                         client_eval=False, checkpoint_every=None, checkpoint_last=False, write_logs=False, progress=False)
        run = FederatedLoop(fed, module, DigitsDataModule(num_clients=4, batch_size=32), RunnerSettings(max_epochs=1,
                            limit_train_batches=3), run_dir=tmp_path / executor, seed=1)
        run.fit()
        return run.state["global"]

    seq, vec = loop("sequential"), loop("vectorized")
    for key, value in seq.items():
        torch.testing.assert_close(vec[key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("network, reason", [("test_vec_batchnorm", "running statistics"),
                                             ("test_vec_dropout", "dropout")])
def test_networks_it_cannot_batch_are_refused_naming_the_layer(network, reason):
    dm = DigitsDataModule(num_clients=2)
    dm.setup()
    with pytest.raises(ConfigError, match=f"federation.executor vectorized cannot batch body.* {reason}"):
        Vectorized().bind(_module(network, "sgd"), dm, RunnerSettings())


def test_schedules_other_optimizers_and_accumulation_are_refused():
    dm = DigitsDataModule(num_clients=2)
    dm.setup()
    with pytest.raises(ConfigError, match="learning-rate schedules"):
        Vectorized().bind(_module("digits_cnn", "sgd", lr_schedule="linear"), dm, RunnerSettings())
    module = Classifier("digits_cnn", 10, optimizer=lambda p: torch.optim.RMSprop(p, lr=0.1))
    with pytest.raises(ConfigError, match="SGD, Adam and AdamW, not RMSprop"):
        Vectorized().bind(module, dm, RunnerSettings())
    with pytest.raises(ConfigError, match="accumulate_grad_batches=2"):
        Vectorized().bind(_module("digits_cnn", "sgd"), dm, RunnerSettings(accumulate_grad_batches=2))


def test_clients_of_different_architectures_or_regularizers_are_refused():
    dm = DigitsDataModule(num_clients=2)
    dm.setup()
    module = _module("digits_cnn", "sgd")
    executor = Vectorized()
    executor.bind(module, dm, RunnerSettings())
    full = {k: v.clone() for k, v in module.net.state_dict().items()}
    part = {k: v for k, v in full.items() if not k.startswith("classifier")}
    with pytest.raises(ConfigError, match="clients of one architecture: clients 0 and 1 differ at classifier"):
        executor.run([ClientTask(0, ClientPlan(weights=full)), ClientTask(1, ClientPlan(weights=part))])
    own = [ClientTask(c, ClientPlan(weights=full, regularizer=ProximalTerm(dict(full), 0.1))) for c in range(2)]
    with pytest.raises(ConfigError, match="not per-client ProximalTerm regularizers"):
        executor.run(own)


def test_unknown_executor_name_is_a_config_error():
    with pytest.raises(ConfigError, match="'vectorised' is not an executor; use one of sequential, vectorized"):
        build_executor("vectorised")


def test_fedmoe_rounds_with_vectorized_clients_match_sequential(tmp_path):
    """Fed-MoE's clients start from their own synced models (Stage C): batched as one model, their
    training matches one by one, and so do the server's experts and the clients' stored models."""
    from fedmoe.algorithms.fedmoe import FedMoE

    def loop(executor):
        module = _module("digits_cnn", "sgd")
        algo = FedMoE(num_routed=2, num_main=1, lam=0.5, server_epochs=1)
        fed = Federation(algorithm=algo, rounds=2, clients_per_round=3, executor=executor, eval_every=None,
                         eval_last=False, client_eval=False, checkpoint_every=None, checkpoint_last=False,
                         write_logs=False, progress=False)
        run = FederatedLoop(fed, module, DigitsDataModule(num_clients=4, batch_size=32), RunnerSettings(max_epochs=1,
                            limit_train_batches=3), run_dir=tmp_path / executor, seed=1)
        run.fit()
        return run

    seq, vec = loop("sequential"), loop("vectorized")
    for key, value in seq.state["moe"].items():
        torch.testing.assert_close(vec.state["moe"][key], value, atol=1e-4, rtol=1e-4)
    stored = [c for c in range(4) if seq.store.get_weights(c) is not None]
    assert stored and stored == [c for c in range(4) if vec.store.get_weights(c) is not None]
    for cid in stored:
        mine = vec.store.get_weights(cid)
        for key, value in seq.store.get_weights(cid).items():
            torch.testing.assert_close(mine[key], value, atol=1e-4, rtol=1e-4)


def test_failing_clients_are_dropped_and_the_others_still_match(tmp_path):
    from fedmoe.data.federated import ArrayDataset

    class Exploding(ArrayDataset):
        def __getitems__(self, indices):
            raise RuntimeError("disk vanished")

    def dm():
        d = DigitsDataModule(num_clients=3, batch_size=32)
        d.setup()
        c1 = d.splits.client_train[1]
        d.splits.client_train[1] = Exploding(c1.x, c1.y, c1.index)
        return d

    settings = RunnerSettings(max_epochs=1, limit_train_batches=2)
    seq = _run(Sequential(), "digits_cnn", "sgd", dm(), settings)
    vec = _run(Vectorized(), "digits_cnn", "sgd", dm(), settings)
    assert [type(o).__name__ for o in vec] == ["ClientOutcome", "ClientFailure", "ClientOutcome"]
    assert "disk vanished" in vec[1].error
    _assert_close([seq[0], seq[2]], [vec[0], vec[2]], atol=1e-5)


def test_clients_starting_from_their_own_weights_match_sequential():
    dm = DigitsDataModule(num_clients=3, batch_size=32)
    dm.setup()
    settings = RunnerSettings(max_epochs=1, limit_train_batches=2)
    outcomes = {}
    for name, executor in (("seq", Sequential()), ("vec", Vectorized(compute="vmap"))):
        module = _module("digits_cnn", "adam")
        executor.bind(module, dm, settings)
        base = module.net.state_dict()
        g = torch.Generator().manual_seed(3)
        own = [{k: v + 0.01 * c * torch.randn(v.shape, generator=g) for k, v in base.items()} for c in range(3)]
        outcomes[name] = executor.run([ClientTask(c, ClientPlan(weights=own[c], transmit=False)) for c in range(3)])
    for a, b in zip(outcomes["seq"], outcomes["vec"]):
        for key, value in a.result.weights.items():
            torch.testing.assert_close(b.result.weights[key], value, atol=1e-5, rtol=1e-4)
