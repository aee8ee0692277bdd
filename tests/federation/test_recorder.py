"""RoundRecorder's HPARAMS record: flat settings beside the run's results in TensorBoard."""

import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedmoe.federation.recorder import RoundRecorder, flat_config


def test_a_nested_config_flattens_to_dotted_scalars_without_paths():
    config = {
        "seed_everything": 3,
        "model": {"network": "femnist_cnn", "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}},
        "data": {"init_args": {"data_dir": "/somewhere", "batch_size": 32, "client_sizes": [3, 4], "token_cache": "x"}},
        "trainer": {"default_root_dir": "runs/a", "logger": None},
    }
    assert flat_config(config) == {
        "seed_everything": 3, "model.network": "femnist_cnn", "model.optimizer.class_path": "SGD",
        "model.optimizer.init_args.lr": 0.05, "data.init_args.batch_size": 32,
        "data.init_args.client_sizes": "[3, 4]", "trainer.logger": None,
    }


def test_hparams_and_their_metrics_are_written_once_and_skipped_without_finite_metrics(tmp_path):
    rec = RoundRecorder(tmp_path / "a")
    rec.log(1, {"server/test_acc": 0.5})
    rec.write_hparams({"lr": 0.1, "rule": "FedIT", "r": None}, {"hparams/acc": 0.5, "hparams/bytes": math.nan}, 1)
    rec.close()
    acc = EventAccumulator(str(tmp_path / "a")).Reload()
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert "hparams/acc" in acc.Tags()["scalars"] and "hparams/bytes" not in acc.Tags()["scalars"]

    quiet = RoundRecorder(tmp_path / "b", tensorboard=False)
    quiet.log(1, {"server/test_acc": 0.5})
    quiet.write_hparams({"lr": 0.1}, {"hparams/acc": 0.5}, 1)
    quiet.close()
    assert not list((tmp_path / "b").glob("events.out.tfevents.*"))
    empty = RoundRecorder(tmp_path / "c")
    empty.write_hparams({"lr": 0.1}, {"hparams/acc": math.nan}, 1)
    empty.close()
    assert not (tmp_path / "c").exists()
