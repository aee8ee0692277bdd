"""One client's local training on several devices (trainer.strategy ddp): 2 CPU processes (gloo)
give the weights of one process with the same global batches."""

from functools import partial
from pathlib import Path

import pytest
import torch

import fedmoe.cli
from fedmoe.algorithms.fedprox import ProximalTerm
from fedmoe.data.federated import ArrayDataset, FederatedDataModule, client_generator
from fedmoe.errors import ConfigError
from fedmoe.federation import multidevice
from fedmoe.federation.multidevice import BatchShare, SameBatches, fit_on_devices
from fedmoe.federation.runner import LocalRunner, RunnerSettings, check_executor_strategy
from fedmoe.models.classifier import Classifier

# Weights after a few steps agree to float32 rounding only: each process sums the gradient of its
# share of the batch and the two sums are averaged, where one process sums the whole batch in
# another order (about 1e-7 relative per gradient). SGD passes that on scaled by the learning rate.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
# Adam divides each gradient entry by the root of its running square, so an entry whose gradient is
# near zero moves by about lr times its (rounding-sized) relative change: measured 4e-6 after 3 steps
# at lr 1e-2, against 1e-2 and more when a share or a batch is wrong.
ADAM_TOLERANCE = {"rtol": 1e-4, "atol": 2e-5}


def _data(n: int, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return ArrayDataset(x, (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long())


def _loader(dataset: ArrayDataset, batch_size: int = 32):
    """A client's loader: shuffled by its (seed, round, client id) generator."""
    dm = FederatedDataModule(batch_size=batch_size)
    return dm.train_loader(dataset, generator=client_generator(7, 3, 1))


def _module(optimizer) -> Classifier:
    torch.manual_seed(0)
    return Classifier("digits_cnn", 4, optimizer=optimizer)


def _fit(settings: RunnerSettings, optimizer, n: int, regularize: bool = False, state: dict | None = None):
    module = _module(optimizer)
    anchor = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    regularizer = ProximalTerm(anchor, mu=0.5) if regularize else None
    out = LocalRunner(settings, distribute_fits=True).fit(module, _loader(_data(n)), regularizer=regularizer,
                                                          optimizer_state=state)
    return module.net.state_dict(), out


def _assert_same(one, two, tolerance=TOLERANCE) -> None:
    (w1, out1), (w2, out2) = one, two
    assert out1.steps == out2.steps
    assert out2.loss == pytest.approx(out1.loss, rel=1e-5)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], **tolerance, msg=k)


def test_ddp_on_two_cpu_processes_equals_one_process_with_the_same_global_batch():
    # 65 samples in batches of 32: 32, 32, 1 (the last batch leaves rank 1 no row); FedProx's term
    sgd = partial(torch.optim.SGD, lr=0.2, momentum=0.9)
    one = _fit(RunnerSettings(max_epochs=2), sgd, 65, regularize=True)
    two = _fit(RunnerSettings(max_epochs=2, strategy="ddp", devices=2), sgd, 65, regularize=True)
    _assert_same(one, two)
    before = _module(sgd).net.state_dict()
    assert any(not torch.equal(before[k], two[0][k]) for k in before)  # it trained


def test_ddp_with_adam_accumulation_and_optimizer_state_equals_one_process():
    # 69 samples: 32, 32, 5 (shares 3 and 2); 2 batches per step; the Adam state continues
    adam = partial(torch.optim.Adam, lr=1e-2)
    settings = dict(max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=1.0)
    first = _fit(RunnerSettings(**settings), adam, 69)[1].optimizer_state
    one = _fit(RunnerSettings(**settings), adam, 69, state=first)
    two = _fit(RunnerSettings(**settings, strategy="ddp", devices=2), adam, 69, state=first)
    _assert_same(one, two, ADAM_TOLERANCE)
    s1, s2 = one[1].optimizer_state, two[1].optimizer_state
    assert s2["state"][0]["step"] == s1["state"][0]["step"] == first["state"][0]["step"] + 2
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(s2["state"][0][key], s1["state"][0][key], **ADAM_TOLERANCE)


def test_a_failing_process_is_reported_with_its_rank():
    class FailsOnRankOne(Classifier):
        def training_step(self, batch, batch_idx):
            if torch.distributed.get_rank() == 1:
                raise ValueError("bad batch")
            return super().training_step(batch, batch_idx)

    module = FailsOnRankOne("digits_cnn", 4)
    with pytest.raises(RuntimeError, match=r"on 2 devices: rank 1 failed: ValueError: bad batch"):
        LocalRunner(RunnerSettings(strategy="ddp", devices=2), distribute_fits=True).fit(module, _loader(_data(40)))


def test_each_process_gets_its_contiguous_share_of_the_batch_and_the_weight_of_its_loss():
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    parts = [BatchShare(rank, 2)((x, y)) for rank in range(2)]
    assert [p[0][1].tolist() for p in parts] == [[0, 1, 2], [3, 4]]
    assert [p[1] for p in parts] == [2 * 3 / 5, 2 * 2 / 5]
    torch.testing.assert_close(parts[1][0][0], x[3:])
    text = {"input_ids": torch.zeros(4, 7), "labels": torch.ones(4), "pad": 0}
    share, weight = BatchShare(2, 3)(text)
    assert share["input_ids"].shape == (1, 7) and share["pad"] == 0 and weight == 3 * 1 / 4
    empty, weight = BatchShare(1, 2)((x[:1], y[:1]))  # one row for two processes
    assert weight == 0.0 and empty[1].tolist() == [0]


def test_every_process_reads_the_batches_one_process_would_whatever_the_model_draws():
    dataset = _data(50).with_transform(lambda x: x + torch.randn_like(x))  # augmentation from the global RNG
    dm = FederatedDataModule(batch_size=16)
    state = torch.get_rng_state()
    expected = [b[0] for b in dm.train_loader(dataset)]
    torch.set_rng_state(state)
    seen = []
    for batch in SameBatches(dm.train_loader(dataset), state):
        torch.rand(100)  # the model's own draws (dropout) in between
        seen.append(batch[0])
    assert len(seen) == len(expected) == 4
    for a, b in zip(seen, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_strategy_settings_are_read_from_the_trainer_config():
    s = RunnerSettings.from_trainer_config({"accelerator": "cpu", "strategy": "ddp", "devices": 2})
    assert (s.strategy, s.devices, s.world_size, s.distributed) == ("ddp", 2, 2, True)
    assert RunnerSettings.from_trainer_config({"strategy": "DDP", "devices": "auto"}).world_size == 1
    assert RunnerSettings.from_trainer_config({"strategy": "auto", "devices": 1}).distributed is False
    assert LocalRunner(s).device == torch.device("cpu")


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"strategy": "ddp", "devices": 64}, r"trainer.devices=64: 64 CPU processes but this machine has \d+ cores"),
        ({"strategy": "ddp", "devices": [0, 1]}, r"trainer.devices=\[0, 1\]: on the CPU, trainer.devices is the number of processes"),
        ({"strategy": "ddp", "devices": 0}, r"trainer.devices=0: on the CPU"),
        ({"strategy": "horovod", "devices": 2}, r"trainer.strategy='horovod' is not a Lightning strategy: use auto"),
        ({"strategy": "xla", "devices": 2}, r"trainer.strategy='xla' is not supported by local training"),
        ({"strategy": "ddp_spawn", "devices": 2}, r"trainer.strategy=ddp_spawn is not supported .*use trainer.strategy ddp"),
        ({"strategy": "dp", "devices": 2}, r"trainer.strategy=dp is not supported"),
        ({"strategy": "fsdp", "devices": 2}, r"trainer.strategy=fsdp needs GPUs .*trainer.accelerator is cpu"),
        ({"devices": 2}, r"trainer.devices=2: .*one device unless trainer.strategy .*set trainer.strategy ddp"),
        ({"strategy": 3}, r"trainer.strategy=3 is not supported"),
    ],
)
def test_bad_strategy_and_devices_are_one_line_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        RunnerSettings.from_trainer_config(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_devices_without_cuda_are_refused():
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu but this machine has no CUDA GPU"):
        RunnerSettings.from_trainer_config({"accelerator": "gpu", "strategy": "ddp", "devices": [0, 1]})


def test_deepspeed_is_refused_where_it_is_not_installed():
    from lightning.fabric.strategies.deepspeed import _DEEPSPEED_AVAILABLE

    if _DEEPSPEED_AVAILABLE:
        pytest.skip("deepspeed is installed")
    with pytest.raises(ConfigError, match=r"trainer.strategy=deepspeed needs the deepspeed package.*pip install deepspeed"):
        RunnerSettings.from_trainer_config({"strategy": "deepspeed", "devices": 2})


def test_an_executor_that_cannot_train_a_client_on_several_devices_is_refused():
    from fedmoe.executors import Sequential
    from fedmoe.executors.vectorized import Vectorized

    ddp = RunnerSettings(strategy="ddp", devices=2)
    check_executor_strategy(ddp, Sequential())
    check_executor_strategy(RunnerSettings(), Vectorized())
    with pytest.raises(ConfigError, match=r"trainer.strategy=ddp trains each client on 2 devices, which "
                                          r"federation.executor vectorized cannot do.*use federation.executor sequential"):
        check_executor_strategy(ddp, Vectorized())


def test_each_process_trains_with_one_torch_thread_and_its_share_of_the_batch():
    class Recording(Classifier):
        def __init__(self):
            super().__init__("digits_cnn", 4, optimizer=partial(torch.optim.SGD, lr=0.1))
            self.register_buffer("seen", torch.zeros(2, dtype=torch.long))

        def training_step(self, batch, batch_idx):
            self.seen.copy_(torch.tensor([torch.get_num_threads(), len(batch[1])]))
            return super().training_step(batch, batch_idx)

    module = Recording()
    LocalRunner(RunnerSettings(strategy="ddp", devices=2, limit_train_batches=1), distribute_fits=True).fit(
        module, _loader(_data(40), batch_size=10))
    assert module.seen.tolist() == [1, 5]  # rank 0's record: 1 thread, 5 of the 10 rows


def test_server_side_training_stays_in_this_process_on_the_first_device(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("started processes")

    monkeypatch.setattr(multidevice, "fit_on_devices", refuse)
    out = LocalRunner(RunnerSettings(strategy="ddp", devices=2)).fit(_module(partial(torch.optim.SGD, lr=0.1)),
                                                                      _loader(_data(40)))
    assert out.steps == 2


def test_persistent_optimizer_state_needs_ddp():
    runner = LocalRunner(RunnerSettings(strategy="fsdp", devices=2), distribute_fits=True)
    with pytest.raises(RuntimeError, match=r"trainer.strategy=fsdp does not carry optimizer state .*persistent_optimizer false"):
        runner.fit(_module(partial(torch.optim.SGD, lr=0.1)), _loader(_data(40)))


def test_a_module_without_batch_tensors_cannot_be_split():
    with pytest.raises(ValueError, match="tensors whose first dimension is the batch size"):
        BatchShare(0, 2)(["a", "b"])


def test_net_weights_travel_back_into_the_module_used_by_the_executor():
    # The sequential executor reads the trained weights from the module it passed in
    module = _module(partial(torch.optim.SGD, lr=0.5))
    net = module.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    LocalRunner(RunnerSettings(strategy="ddp", devices=2, limit_train_batches=1), distribute_fits=True).fit(
        module, _loader(_data(40)), return_optimizer_state=False)
    assert module.net is net and any(not torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_an_epochs_last_batches_step_even_when_batches_do_not_divide_the_accumulation():
    # 6 batches an epoch, 4 per step: steps after batches 4 and 6 of every epoch, nothing left over
    sgd = partial(torch.optim.SGD, lr=0.1)
    module = _module(sgd)
    out = LocalRunner(RunnerSettings(accumulate_grad_batches=4)).fit(module, _loader(_data(96), 16), epochs=3)
    assert out.steps == 6
    assert all(p.grad is None for p in module.net.parameters())


# -- the command line ------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "experiments" / "examples" / "large_client_ddp.yaml"
needs_cli_strategy = pytest.mark.skipif(
    "strategy: str" not in Path(fedmoe.cli.__file__).read_text(),
    reason="fedmoe.cli's trainer section does not take strategy yet",
)


def _cli(tmp_path, *args: str) -> list[str]:
    return ["fit", "--config", str(EXAMPLE), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--federation.progress", "false", *args]


@needs_cli_strategy
def test_the_example_config_trains_its_clients_on_two_processes(tmp_path, capsys, monkeypatch):
    worlds = []

    def counted(module, loader, settings, *args):
        worlds.append(settings.world_size)
        return fit_on_devices(module, loader, settings, *args)

    monkeypatch.setattr(multidevice, "fit_on_devices", counted)
    assert fedmoe.cli.main(_cli(tmp_path, "--federation.rounds", "1", "--federation.clients_per_round", "1",
                                "--trainer.max_epochs", "1")) == 0
    assert "FedAvg: 1 round in" in capsys.readouterr().out
    assert worlds == [2]
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 2


@needs_cli_strategy
@pytest.mark.parametrize(
    "args, message",
    [
        (["--federation.executor", "vectorized"], "error: trainer.strategy=ddp trains each client on 2 devices, which "
                                                  "federation.executor vectorized cannot do"),
        (["--trainer.devices", "64"], "error: trainer.devices=64: 64 CPU processes but this machine has"),
        (["--trainer.strategy", "horovod"], "error: trainer.strategy='horovod' is not a Lightning strategy"),
    ],
)
def test_the_command_line_refuses_bad_multi_device_input_with_one_line(tmp_path, capsys, args, message):
    code = fedmoe.cli.main(_cli(tmp_path, *args))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "run" / "checkpoints").exists()
