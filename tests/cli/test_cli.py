"""The command line, end to end on small data: fit, resume, validate/test and bad input."""

from pathlib import Path

import pytest
import torch

from fedmoe.cli import main
from fedmoe.federation.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
FAST = ["--trainer.max_epochs", "1", "--federation.progress", "false"]


def fit(run_dir, *extra):
    return main(["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(run_dir), *FAST, *extra])


def one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_fit_writes_config_metrics_events_checkpoint_and_summary(tmp_path, capsys):
    run = tmp_path / "run"
    assert fit(run, "--federation.rounds", "2") == 0
    out = capsys.readouterr().out
    assert "FedMoE: 2 rounds" in out and "server test acc" in out
    for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert "class_path: fedmoe.algorithms.fedmoe.FedMoE" in (run / "config.yaml").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("server/test_acc", "server/test_loss", "clients/acc_mean", "clients/acc_min", "clients/acc_max",
                "fedmoe/gate_entropy", "fedmoe/alpha", "fedmoe/utilisation/expert_1", "time/round_s",
                "comm/bytes_up", "comm/bytes_down"):
        assert tag in scalars, tag
    assert {"fedmoe/W_r", "fedmoe/W_c"} <= set(acc.Tags()["images"])


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    assert fit(tmp_path / "full", "--federation.rounds", "3") == 0
    assert fit(tmp_path / "cut", "--federation.rounds", "2") == 0
    assert fit(tmp_path / "cut", "--federation.rounds", "3", "--ckpt_path", "last") == 0
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert a["round"] == b["round"] == 3
    for key, value in a["server_state"]["moe"].items():
        assert torch.equal(value, b["server_state"]["moe"][key]), key
    assert a["store"]["weights"].keys() == b["store"]["weights"].keys()
    for cid, weights in a["store"]["weights"].items():
        for key, value in weights.items():
            assert torch.equal(value, b["store"]["weights"][cid][key]), (cid, key)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    csv = (tmp_path / "cut" / "metrics.csv").read_text().strip().splitlines()
    assert [ln.split(",")[0] for ln in csv[1:]] == ["1", "2", "3"]


def test_validate_and_test_evaluate_a_saved_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert fit(run, "--federation.rounds", "1") == 0
    capsys.readouterr()
    for sub in ("validate", "test"):
        code = main([sub, "--config", QUICKSTART, "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "1",
                     "--ckpt_path", "last"])
        assert code == 0
        out = capsys.readouterr().out
        assert "(round 1)" in out and "acc" in out


def test_checkpoint_from_another_config_is_refused_naming_the_key(tmp_path, capsys):
    run = tmp_path / "run"
    assert fit(run, "--federation.rounds", "1") == 0
    capsys.readouterr()
    code = fit(run, "--federation.rounds", "2", "--ckpt_path", "last", "--federation.algorithm.init_args.lam", "0.3")
    assert code == 2
    line = one_error_line(capsys)
    assert "federation.algorithm.init_args.lam (0.5 -> 0.3)" in line


def test_new_run_in_a_folder_holding_a_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert fit(run, "--federation.rounds", "1") == 0
    capsys.readouterr()
    assert fit(run, "--federation.rounds", "1") == 2
    assert "--ckpt_path last" in one_error_line(capsys)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--federation.algorithm", "fedmoe.algorithms.NoSuchAlgorithm"], 'key "federation.algorithm"'),
        (["--federation.rounds", "many"], 'key "federation.rounds"'),
        (["--data.init_args.no_such_option", "1"], 'key "data"'),
    ],
)
def test_bad_cli_values_are_one_line_naming_the_key(tmp_path, capsys, args, expected):
    assert fit(tmp_path / "run", *args) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_evaluating_without_a_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["test", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert "needs --ckpt_path" in one_error_line(capsys)


def _femnist_args(data_dir, run_dir, *extra):
    return ["fit", "--config", str(ROOT / "experiments" / "femnist" / "fedmoe.yaml"),
            "--data.init_args.data_dir", str(data_dir), "--trainer.default_root_dir", str(run_dir), *FAST, *extra]


def test_missing_data_dir_names_the_path_and_how_to_get_it(tmp_path, capsys):
    assert main(_femnist_args(tmp_path / "nowhere", tmp_path / "run")) == 2
    line = one_error_line(capsys)
    assert "nowhere" in line and "leaf" in line.lower()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_more_clients_than_writers_states_the_arithmetic(tmp_path, capsys, femnist_dir):
    args = _femnist_args(femnist_dir, tmp_path / "run", "--data.init_args.num_clients", "10")
    assert main(args) == 2
    assert "writers" in one_error_line(capsys)


def test_cifar_missing_data_is_one_line(tmp_path, capsys):
    args = ["fit", "--config", str(ROOT / "experiments" / "cifar10" / "fedavg.yaml"),
            "--data.init_args.data_dir", str(tmp_path / "empty"), "--trainer.default_root_dir", str(tmp_path / "r")]
    assert main(args) == 2
    assert "empty" in one_error_line(capsys)
