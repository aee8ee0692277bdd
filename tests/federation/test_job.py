"""The job builder: a fit config turned into its objects without running, with fit's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fedmoe.errors import ConfigError
from fedmoe.federation.job import build_job, build_job_from_text
from fedmoe.federation.loop import FederatedLoop


def _config(folder: Path, **model) -> Path:
    config = {
        "seed_everything": 5,
        "trainer": {"max_epochs": 1, "limit_train_batches": 1, "default_root_dir": str(folder / "run"),
                    "enable_progress_bar": False},
        "model": {"network": "digits_cnn", "num_classes": 10,
                  "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}, **model},
        "data": {"class_path": "fedmoe.data.digits.DigitsDataModule", "init_args": {"num_clients": 3, "batch_size": 16}},
        "federation": {"rounds": 1, "clients_per_round": 2, "eval_every": None, "eval_last": False,
                       "client_eval": False, "checkpoint_every": None, "checkpoint_last": False,
                       "write_logs": False, "progress": False},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_build_job_gives_fits_objects_and_a_config_that_rebuilds_the_same_start(tmp_path):
    job = build_job(_config(tmp_path), ["--federation.rounds", "2"])
    assert job.num_clients == 3 and job.seed == 5 and job.federation.rounds == 2
    assert job.run_dir == tmp_path / "run"
    again = build_job_from_text(job.config_yaml)
    assert again.federation.rounds == 2
    for a, b in zip(job.module.state_dict().values(), again.module.state_dict().values()):
        assert torch.equal(a, b)


def test_built_job_runs_with_the_engine_loop(tmp_path):
    job = build_job(_config(tmp_path))
    loop = FederatedLoop(job.federation, job.module, job.datamodule, settings=job.settings, run_dir=job.run_dir,
                         seed=job.seed)
    loop.fit()
    assert loop.round == 1 and not (tmp_path / "run" / "checkpoints").exists()


def test_build_job_refuses_a_model_whose_classes_do_not_fit_the_data(tmp_path):
    with pytest.raises(ConfigError, match="model.num_classes=7 but the data set has 10 classes"):
        build_job(_config(tmp_path, num_classes=7))


def test_build_job_refuses_a_negative_learning_rate(tmp_path):
    path = _config(tmp_path)
    with pytest.raises(ConfigError, match="model.optimizer: Invalid learning rate: -1.0"):
        build_job(path, ["--model.optimizer.init_args.lr", "-1.0"])
