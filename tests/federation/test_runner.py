import pytest
import torch
from torch import nn

from fedmoe.algorithms.fedprox import ProximalTerm
from fedmoe.data.federated import ArrayDataset, batch_collate
from fedmoe.errors import ConfigError
from fedmoe.federation.runner import LocalRunner, RunnerSettings
from fedmoe.models.classifier import Classifier
from torch.utils.data import DataLoader


def _separable(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    return ArrayDataset(x, y)


def _loader(ds, bs=32, shuffle=True):
    return DataLoader(ds, batch_size=bs, shuffle=shuffle, collate_fn=batch_collate)


def _module(lr=1e-2):
    torch.manual_seed(0)
    return Classifier("digits_cnn", 2, optimizer=lambda p: torch.optim.Adam(p, lr=lr))


def test_fit_trains_through_training_step_and_reduces_loss():
    ds, m, runner = _separable(), _module(), LocalRunner(RunnerSettings(max_epochs=1))
    before = runner.evaluate(m, _loader(ds, shuffle=False))
    out = runner.fit(m, _loader(ds), epochs=5)
    after = runner.evaluate(m, _loader(ds, shuffle=False))
    assert out.steps == 5 * 8
    assert after["loss"] < before["loss"] and after["acc"] > 0.8


def test_step_limits_are_honoured():
    ds = _separable()
    out = LocalRunner(RunnerSettings(limit_train_batches=3)).fit(_module(), _loader(ds), epochs=2)
    assert out.steps == 6
    out = LocalRunner(RunnerSettings(max_steps=5)).fit(_module(), _loader(ds), epochs=3)
    assert out.steps == 5
    out = LocalRunner(RunnerSettings(accumulate_grad_batches=4)).fit(_module(), _loader(ds), epochs=1)
    assert out.steps == 2


def test_optimizer_state_is_returned_and_can_continue():
    ds, m, runner = _separable(), _module(), LocalRunner()
    first = runner.fit(m, _loader(ds), epochs=1)
    steps = first.optimizer_state["state"][0]["step"]
    second = runner.fit(m, _loader(ds), epochs=1, optimizer_state=first.optimizer_state)
    assert second.optimizer_state["state"][0]["step"] == steps + 8
    fresh = runner.fit(m, _loader(ds), epochs=1)
    assert fresh.optimizer_state["state"][0]["step"] == 8


def test_regularizer_enters_the_loss():
    ds, m = _separable(), _module(lr=1e-2)
    anchor = {k: v.clone() for k, v in m.net.state_dict().items()}
    LocalRunner().fit(m, _loader(ds), epochs=2, regularizer=ProximalTerm(anchor, mu=1e4))
    strong = sum((p - anchor[n]).abs().max().item() for n, p in m.net.named_parameters())
    m2 = _module(lr=1e-2)
    LocalRunner().fit(m2, _loader(ds), epochs=2)
    free = sum((p - anchor[n]).abs().max().item() for n, p in m2.net.named_parameters())
    assert strong < 0.2 * free


def test_evaluate_matches_a_hand_computation():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.stack([x[:, 0], -x[:, 0]], 1)

    x = torch.tensor([[1.0], [2.0], [-1.0], [0.5]])
    y = torch.tensor([0, 1, 1, 1])
    out = LocalRunner().evaluate(Fixed(), _loader(ArrayDataset(x, y), shuffle=False))
    logits = torch.stack([x[:, 0], -x[:, 0]], 1)
    assert abs(out["acc"] - 0.5) < 1e-9
    assert abs(out["loss"] - torch.nn.functional.cross_entropy(logits, y).item()) < 1e-6


def test_trainer_keys_without_effect_are_refused_saying_what_to_use():
    with pytest.raises(ConfigError, match=r"trainer.callbacks has no effect in federated runs: .*training_step"):
        RunnerSettings.from_trainer_config({"callbacks": ["x"], "max_epochs": 2})
    with pytest.raises(ConfigError, match=r"trainer.val_check_interval .*federation.eval_every \(also trainer.profiler\)"):
        RunnerSettings.from_trainer_config({"val_check_interval": 0.5, "profiler": "simple"})
    lightning_defaults = {"strategy": "auto", "num_nodes": 1, "inference_mode": True, "callbacks": None,
                          "enable_checkpointing": True, "enable_model_summary": False, "max_epochs": 3}
    assert RunnerSettings.from_trainer_config(lightning_defaults).max_epochs == 3


def test_fast_dev_run_stops_each_local_fit_after_that_many_batches():
    s = RunnerSettings.from_trainer_config({"fast_dev_run": True, "max_epochs": 5})
    assert (s.fast_dev_run, s.limit_train_batches, s.max_epochs) == (1, 1, 1)
    out = LocalRunner(RunnerSettings.from_trainer_config({"fast_dev_run": 3})).fit(_module(), _loader(_separable()))
    assert out.steps == 3


def test_deterministic_is_applied_to_torch():
    try:
        LocalRunner(RunnerSettings.from_trainer_config({"deterministic": True}))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"max_epochs": 0}, r"trainer.max_epochs=0 is out of range"),
        ({"max_epochs": -1}, r"trainer.max_epochs=-1 .*trainer.max_steps"),
        ({"accumulate_grad_batches": 0}, r"trainer.accumulate_grad_batches=0"),
        ({"gradient_clip_val": float("nan")}, r"trainer.gradient_clip_val=nan"),
        ({"devices": 2}, r"trainer.devices=2: .*one device"),
        ({"devices": [0, 1]}, r"one device"),
        ({"accelerator": "tpu"}, r"trainer.accelerator='tpu' is not supported"),
        ({"precision": "8-bit"}, r"trainer.precision='8-bit'"),
        ({"logger": "tensorboard"}, r"trainer.logger='tensorboard' is not supported"),
        ({"log_every_n_steps": 0}, r"trainer.log_every_n_steps=0"),
    ],
)
def test_out_of_range_trainer_values_name_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        RunnerSettings.from_trainer_config(cfg)
