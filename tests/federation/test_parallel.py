"""The parallel executor: persistent worker processes give bit-identical results to the sequential
executor on the CPU (one torch thread on both sides), survive a killed worker, stop on close, and
refuse devices that do not exist with one line.

Spawning a worker costs an interpreter start plus torch and Lightning imports (seconds), so the tests
share one 2-worker pool (``pool``) and rebind it to each test's module and data."""

import functools
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedmoe.algorithms.base import ClientPlan
from fedmoe.algorithms.fedprox import FedProx
from fedmoe.cli import main
from fedmoe.data.digits import DigitsDataModule
from fedmoe.errors import ConfigError
from fedmoe.executors import ClientFailure, ClientTask, Sequential, build_executor
from fedmoe.executors.base import ClientOutcome
from fedmoe.executors.parallel import Parallel, _loads, _Packer, parse_devices
from fedmoe.federation.loop import FederatedLoop, Federation
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier

QUIET = dict(eval_every=None, eval_last=False, client_eval=False, checkpoint_every=None, checkpoint_last=False,
             write_logs=False, progress=False)


@pytest.fixture(scope="module")
def pool():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' count: bit-identical kernels on both sides
    executor = Parallel("cpu:2")
    yield executor
    executor.close()
    torch.set_num_threads(threads)


def _module(optimizer=None) -> Classifier:
    torch.manual_seed(0)
    return Classifier("digits_cnn", 10, optimizer=optimizer or functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9))


def _loop(executor, tmp_path, name, **fed) -> FederatedLoop:
    optimizer = functools.partial(torch.optim.Adam, lr=1e-3) if fed.pop("adam", False) else None
    federation = Federation(executor=executor, **{**QUIET, **fed})
    loop = FederatedLoop(federation, _module(optimizer), DigitsDataModule(num_clients=6, batch_size=32),
                         RunnerSettings(max_epochs=1), run_dir=tmp_path / name, seed=5)
    loop.fit()
    return loop


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_fedavg_rounds_on_two_cpu_workers_equal_sequential_bit_for_bit(pool, tmp_path):
    seq = _loop(Sequential(), tmp_path, "seq", rounds=3, clients_per_round=4)
    par = _loop(pool, tmp_path, "par", rounds=3, clients_per_round=4)
    _assert_equal_states(seq.state["global"], par.state["global"])
    assert [r["clients/train_loss"] for r in seq.history] == [r["clients/train_loss"] for r in par.history]
    assert all(r["clients/ok"] == 4 for r in par.history)
    assert [w.threads for w in pool._workers] == [1, 1]


def test_fedprox_with_persistent_adam_states_equals_sequential_bit_for_bit(pool, tmp_path):
    fed = dict(rounds=2, clients_per_round=3, persistent_optimizer=True, adam=True)
    seq = _loop(Sequential(), tmp_path, "seq", algorithm=FedProx(mu=0.1), **fed)
    par = _loop(pool, tmp_path, "par", algorithm=FedProx(mu=0.1), **fed)
    _assert_equal_states(seq.state["global"], par.state["global"])
    clients = {int(c) for r in seq.history for c in r["clients"].split()}
    for cid in clients:
        a, b = seq.store.get_optimizer(cid), par.store.get_optimizer(cid)
        assert a["param_groups"] == b["param_groups"]
        for i, entry in a["state"].items():
            _assert_equal_states(entry, b["state"][i])


def _tasks(module, clients, options=None):
    start = {k: v.clone() for k, v in module.net.state_dict().items()}
    options = options or {}
    return [ClientTask(c, ClientPlan(weights=start, **options.get(c, {})), round=1, seed=2) for c in clients]


def _assert_same_outcomes(seq: list, par: list) -> None:
    for a, b in zip(seq, par):
        assert isinstance(b, ClientOutcome) and a.result.client_id == b.result.client_id
        assert a.result.metrics == b.result.metrics and a.result.num_samples == b.result.num_samples
        _assert_equal_states(a.result.weights, b.result.weights)


def test_a_worker_killed_mid_round_is_restarted_and_its_clients_rerun(pool):
    dm = DigitsDataModule(num_clients=6, batch_size=16)
    dm.setup()
    settings = RunnerSettings(max_epochs=8)
    module = _module()
    tasks = _tasks(module, range(6))
    pool.bind(module, dm, settings)
    pool.start()
    victim, restarts = pool.pids[0], pool.restarts

    def kill_after_first_result():
        deadline = time.monotonic() + 60
        while pool._workers[0].received < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_result)
    killer.start()
    outcomes = pool.run(tasks)
    killer.join()
    assert pool.restarts == restarts + 1 and pool.reruns >= 1
    assert victim not in pool.pids and len(pool.pids) == 2
    assert all(v.is_shared() for o in outcomes for v in o.result.weights.values())  # views of shared buffers
    sequential = Sequential()
    sequential.bind(module, dm, settings)
    _assert_same_outcomes(sequential.run(tasks), outcomes)


def test_a_weights_dict_shared_by_clients_is_packed_once_into_shared_buffers():
    module = _module()
    tasks = _tasks(module, range(3))
    packer = _Packer()
    blobs = [packer.dumps([(0, t)]) for t in tasks]
    packed = packer.pack()
    assert len(packer.tensors) == len(tasks[0].plan.weights)
    assert set(packed.buffers) == {"float32"} and all(b.is_shared() for b in packed.buffers.values())
    first, second = (_loads(b, packed)[0][1].plan.weights for b in blobs[:2])
    _assert_equal_states(tasks[0].plan.weights, first)
    key = next(iter(first))
    assert first[key].data_ptr() == second[key].data_ptr() and first[key].data_ptr() % 64 == 0


def test_unpicklable_models_are_refused_at_bind():
    dm = DigitsDataModule(num_clients=2)
    dm.setup()
    module = Classifier("digits_cnn", 10, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ConfigError, match="sends the model to its worker processes, but it cannot be pickled"):
        Parallel("cpu:1").bind(module, dm, RunnerSettings())


@pytest.mark.parametrize("devices, message", [
    ("cpu:0", r"devices='cpu:0' starts no worker"),
    ("cpu:3", r"devices='cpu:3' asks for 3 CPU workers but this machine has 2 cores"),
    ("gpu:2", r"devices='gpu:2' is not a device list: use cpu:N"),
    ("cpu:two", r"devices=.cpu:two. is not a device list"),
    ([], r"devices=\[\] is not a device list"),
    ([0, 1], r"devices=\[0, 1\]: there is no GPU 0; this machine has no CUDA GPU: use cpu:N"),
])
def test_devices_that_do_not_exist_or_are_malformed_are_refused(devices, message, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="federation.executor." + message):
        parse_devices(devices)


def test_the_executor_by_name_runs_two_cpu_workers():
    executor = build_executor("parallel")
    assert isinstance(executor, Parallel) and executor.device_list == ["cpu", "cpu"] and executor.pids == []
    assert parse_devices(" CPU:1 ") == ["cpu"]


def _config(tmp_path: Path, devices: str) -> Path:
    path = tmp_path / "parallel.yaml"
    path.write_text(f"""
seed_everything: 1
trainer: {{default_root_dir: {tmp_path / 'run'}, max_epochs: 1, logger: false, enable_progress_bar: false}}
model: {{network: digits_cnn, num_classes: 10, optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 0.05}}}}}}
data: {{class_path: fedmoe.data.digits.DigitsDataModule, init_args: {{num_clients: 4, batch_size: 32}}}}
federation:
  rounds: 2
  clients_per_round: 2
  client_eval: false
  progress: false
  executor: {{class_path: fedmoe.executors.parallel.Parallel, init_args: {{devices: "{devices}"}}}}
""")
    return path


def test_cli_runs_the_parallel_executor_from_yaml_and_stops_its_workers_when_the_rounds_end(tmp_path, pool, capsys,
                                                                                             monkeypatch):
    started = []
    real_start = Parallel.start

    def start(self):
        real_start(self)
        started.extend((p.pid, p.daemon) for p in multiprocessing.active_children() if p.name.startswith("fedmoe-parallel"))

    monkeypatch.setattr(Parallel, "start", start)
    before = {p.pid for p in multiprocessing.active_children()}
    assert main(["fit", "--config", str(_config(tmp_path, "cpu:1"))]) == 0
    assert "FedAvg: 2 rounds" in capsys.readouterr().out
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3
    mine = {pid: daemon for pid, daemon in started if pid not in before}
    assert len(mine) == 1 and all(mine.values())  # one daemonic worker: it cannot outlive this process
    assert not [p for p in multiprocessing.active_children() if p.pid in mine]
    for pid in mine:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_cli_refuses_bad_devices_with_one_line(tmp_path, capsys):
    code = main(["fit", "--config", str(_config(tmp_path, "cpu:0"))])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: federation.executor.devices='cpu:0' starts no worker")
    assert not (tmp_path / "run").exists()


def test_a_client_whose_worker_dies_twice_is_a_client_failure(pool):
    dm = DigitsDataModule(num_clients=3, batch_size=32)
    dm.setup()
    module = _module()
    pool.bind(module, dm, RunnerSettings(max_epochs=1))
    tasks = _tasks(module, [0, 2], {2: {"regularizer": sys.exit}})  # exits the worker that trains it
    restarts = pool.restarts
    outcomes = pool.run(tasks)
    assert isinstance(outcomes[1], ClientFailure) and "died twice" in outcomes[1].error
    assert pool.restarts == restarts + 2 and len(pool.pids) == 1  # the idle one is started by the next run
    sequential = Sequential()
    sequential.bind(module, dm, RunnerSettings(max_epochs=1))
    _assert_same_outcomes(sequential.run(tasks[:1]), outcomes[:1])


def test_close_stops_every_worker_process(pool):
    pids = pool.pids
    assert pids
    pool.close()
    assert pool.pids == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
