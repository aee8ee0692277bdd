"""The client module's linear warm-up/decay schedule, sized by the runner to each local fit."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmoe.errors import FedMoEError
from fedmoe.federation.runner import LocalRunner, RunnerSettings
from fedmoe.models.classifier import Classifier


def test_linear_schedule_warms_up_then_decays_to_zero_over_the_local_fit():
    torch.manual_seed(0)
    module = Classifier("digits_cnn", 10, optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
                        lr_schedule="linear", warmup_ratio=0.25)
    data = TensorDataset(torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,)))
    lrs = []
    runner = LocalRunner(RunnerSettings(max_epochs=2))
    original = torch.optim.SGD.step

    def spy(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return original(self, *a, **k)

    torch.optim.SGD.step = spy
    try:
        runner.fit(module, DataLoader(data, batch_size=10))
    finally:
        torch.optim.SGD.step = original
    assert module.planned_steps == 8
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_frozen_parameters_get_no_optimizer_state():
    module = Classifier("digits_cnn", 10)
    module.net.features[0].weight.requires_grad_(False)
    optimizer = module.configure_optimizers()
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(module.net.features[0].weight) not in params


def test_warmup_ratio_out_of_range_is_refused():
    with pytest.raises(FedMoEError, match="warmup_ratio"):
        Classifier("digits_cnn", 10, warmup_ratio=1.5)
