"""The command line, end to end on small data: fit, resume, validate/test, bad input, Ctrl-C, kills."""

import json
import os
import re
import signal
import subprocess
import sys
import time
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


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def assert_same_run(a: dict, b: dict) -> None:
    """Two checkpoints hold the same server state, client store, history (but time) and RNG."""
    assert a["round"] == b["round"]
    for key, value in a["server_state"]["moe"].items():
        assert torch.equal(value, b["server_state"]["moe"][key]), key
    assert a["store"]["weights"].keys() == b["store"]["weights"].keys()
    for cid, weights in a["store"]["weights"].items():
        for key, value in weights.items():
            assert torch.equal(value, b["store"]["weights"][cid][key]), (cid, key)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.fixture(scope="module")
def full2(tmp_path_factory) -> Path:
    """An uninterrupted 2-round quickstart run (read, never changed, by the tests)."""
    run = tmp_path_factory.mktemp("full2") / "run"
    assert fit(run, "--federation.rounds", "2") == 0
    return run


def test_fit_writes_config_metrics_events_checkpoint_and_summary(tmp_path, capsys):
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert fit(run, "--federation.rounds", "1", "--seed_everything", "true") == 0
    finally:
        os.umask(old)
    out = capsys.readouterr().out
    assert "FedMoE: 1 round in" in out and "server test acc" in out
    for name in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes
    config = (run / "config.yaml").read_text()
    assert "class_path: fedmoe.algorithms.fedmoe.FedMoE" in config
    seed = re.search(r"^seed_everything: (\d+)$", config, re.M)
    assert seed and int(seed.group(1)) != 0, "seed_everything: true draws a seed and records it"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import pandas as pd

    acc = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("server/test_acc", "server/test_loss", "clients/acc_mean", "clients/acc_min", "clients/acc_max",
                "fedmoe/gate_entropy", "fedmoe/alpha", "fedmoe/utilisation/expert_1", "time/round_s",
                "comm/bytes_up", "comm/bytes_down"):
        assert tag in scalars, tag
    assert {"fedmoe/W_r", "fedmoe/W_c"} <= set(acc.Tags()["images"])
    clients = pd.read_csv(run / "clients.csv")
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(clients.columns) == ["round", "client", "status", "samples", "steps", "train_loss", "bytes_down",
                                     "bytes_up", "heldout_loss", "heldout_acc"]
    assert sorted(clients["client"]) == sorted(int(c) for c in str(metrics["clients"][0]).split())
    assert set(clients["status"]) == {"ok"} and (clients["samples"] > 0).all() and (clients["heldout_acc"] >= 0).all()
    for key in ("bytes_up", "bytes_down"):  # the round's totals are the clients' sums
        assert clients[key].sum() == metrics[f"comm/{key}"][0] > 0
    assert clients["train_loss"].mean() == pytest.approx(metrics["clients/train_loss"][0])
    hparams = _hparams(acc)
    assert hparams["federation.algorithm.class_path"] == "FedMoE" and hparams["federation.rounds"] == 1
    assert not any(k.endswith(("data_dir", "default_root_dir")) for k in hparams)  # paths name a machine
    assert {"hparams/best_val_test_acc", "hparams/test_acc_last", "hparams/MB_up_per_round"} <= scalars

    matrices = pd.read_csv(run / "matrices.csv")
    sampled = sorted(int(c) for c in str(pd.read_csv(run / "metrics.csv")["clients"][0]).split())
    for key, normalised_over in (("fedmoe/W_r", "row"), ("fedmoe/W_c", "column")):
        m = matrices[matrices["matrix"] == key]
        assert set(m["round"]) == {1} and sorted(set(m["client"])) == sampled, key
        for client, column in zip(m["client"], m["column"]):
            assert client == sampled[column]
        sums = m.groupby(normalised_over)["value"].sum()  # W_r: a distribution over clients per expert
        assert len(sums) > 1 and all(abs(v - 1) < 1e-6 for v in sums), (key, sums)


def _hparams(acc) -> dict:
    """The settings a run's TensorBoard events show in the HPARAMS tab."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    out = {}
    for key, value in info.hparams.items():
        kind = value.WhichOneof("kind")
        out[key] = getattr(value, kind) if kind else None
    return out


def test_resumed_run_is_bit_identical_and_keeps_the_time_and_record_of_all_sessions(tmp_path, full2):
    cut = tmp_path / "cut"
    assert fit(cut, "--federation.rounds", "1") == 0
    first = json.loads((cut / "summary.json").read_text())
    assert fit(cut, "--federation.rounds", "2", "--ckpt_path", "last") == 0
    assert_same_run(load_checkpoint(full2 / "checkpoints" / "last.ckpt"), load_checkpoint(cut / "checkpoints" / "last.ckpt"))
    csv = (cut / "metrics.csv").read_text().strip().splitlines()
    assert [ln.split(",")[0] for ln in csv[1:]] == ["1", "2"]
    assert (cut / "matrices.csv").read_text() == (full2 / "matrices.csv").read_text()
    assert (cut / "clients.csv").read_text() == (full2 / "clients.csv").read_text()
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["rounds"] == 2 and len(summary["sessions"]) == 2
    assert summary["seconds"] > first["seconds"]
    assert summary["seconds"] == pytest.approx(sum(s["seconds"] for s in summary["sessions"]), abs=0.02)
    config = (cut / "config.yaml").read_text()
    assert re.search(r"^  rounds: 2$", config, re.M)
    assert "1. " in config and "new run" in config and "2. " in config and "resumed from" in config


def test_resume_with_fewer_or_as_many_rounds_changes_nothing(full2, capsys):
    before = snapshot(full2)
    assert fit(full2, "--federation.rounds", "1", "--ckpt_path", "last") == 2
    line = one_error_line(capsys)
    assert "federation.rounds=1" in line and "already done 2 rounds" in line
    assert fit(full2, "--federation.rounds", "2", "--ckpt_path", "last") == 0
    assert "nothing to do, nothing changed" in capsys.readouterr().out
    assert snapshot(full2) == before


def test_saved_config_reruns_the_experiment_and_evaluates_it(tmp_path, full2, capsys):
    config = str(full2 / "config.yaml")
    again = tmp_path / "again"
    assert main(["fit", "--config", config, "--trainer.default_root_dir", str(again), "--federation.rounds", "1"]) == 0
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith("time/")}  # noqa: E731
    reference = load_checkpoint(full2 / "checkpoints" / "last.ckpt")["history"][0]
    assert strip(load_checkpoint(again / "checkpoints" / "last.ckpt")["history"][0]) == strip(reference)
    capsys.readouterr()
    assert main(["test", "--config", config, "--ckpt_path", "last"]) == 0
    assert "(round 2)" in capsys.readouterr().out
    training_only = ["--model.optimizer.init_args.lr", "0.1", "--trainer.max_epochs", "4",
                     "--federation.algorithm.init_args.lam", "0.2"]
    assert main(["validate", "--config", config, "--ckpt_path", "last", *training_only]) == 0
    assert "(round 2)" in capsys.readouterr().out
    assert main(["test", "--config", config, "--ckpt_path", "last", "--federation.algorithm.init_args.num_routed", "2"]) == 2
    assert "federation.algorithm.init_args.num_routed (3 -> 2)" in one_error_line(capsys)


def test_checkpoint_from_another_config_is_refused_naming_the_key(full2, capsys):
    before = snapshot(full2)
    code = fit(full2, "--federation.rounds", "3", "--ckpt_path", "last", "--federation.algorithm.init_args.lam", "0.3")
    assert code == 2
    assert "federation.algorithm.init_args.lam (0.5 -> 0.3)" in one_error_line(capsys)
    assert snapshot(full2) == before


def test_a_checkpoint_written_before_an_option_existed_resumes_while_it_keeps_its_default(tmp_path, capsys):
    from fedmoe.federation.checkpoint import save_checkpoint

    run = tmp_path / "run"
    assert fit(run, "--federation.rounds", "1") == 0
    path = run / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(path)
    added = ["federation.algorithm.init_args.noisy_gate", "model.label_smoothing"]
    assert all(k in ckpt["config"] for k in added)
    for key in added:  # as if written before these options existed
        del ckpt["config"][key]
    ckpt.pop("format_version")
    save_checkpoint(path, ckpt)
    assert fit(run, "--federation.rounds", "2", "--ckpt_path", "last", "--model.label_smoothing", "0.1") == 2
    assert "model.label_smoothing ('<unset>' -> 0.1)" in one_error_line(capsys)
    assert fit(run, "--federation.rounds", "2", "--ckpt_path", "last") == 0


def test_new_run_in_a_folder_holding_a_run_is_refused(full2, capsys):
    before = snapshot(full2)
    assert fit(full2, "--federation.rounds", "1") == 2
    assert "--ckpt_path last" in one_error_line(capsys)
    assert snapshot(full2) == before


def test_fast_dev_run_is_a_one_round_smoke_run_that_saves_nothing(tmp_path, capsys):
    assert fit(tmp_path / "run", "--trainer.fast_dev_run", "true") == 0
    assert "FedMoE: 1 round in" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_fit_help_lists_only_honoured_trainer_keys_and_the_built_ins(capsys):
    assert main(["fit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--trainer.fast_dev_run" in text and "--trainer.max_epochs" in text
    assert "--trainer.strategy" in text  # one client on several devices
    for refused in ("--trainer.callbacks", "--trainer.check_val_every_n_epoch", "--weights_only"):
        assert refused not in text
    for name in ("FedAvg", "FedProx", "FedMoE", "digits_cnn", "femnist_cnn", "DigitsDataModule", "CIFAR10DataModule"):
        assert name in text
    assert "'last'" in text
    assert main(["fit", "--federation.algorithm.help", "FedMoE"]) == 0
    assert "--federation.algorithm.num_routed" in capsys.readouterr().out


GPU = torch.cuda.is_available()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--federation.algorithm", "fedmoe.algorithms.NoSuchAlgorithm"], 'key "federation.algorithm"'),
        (["--federation.rounds", "many"], 'key "federation.rounds"'),
        (["--data.init_args.no_such_option", "1"], 'key "data"'),
        (["--federation.rounds", "0"], "federation.rounds=0"),
        (["--federation.clients_per_round", "0"], "federation.clients_per_round=0"),
        (["--federation.min_clients", "6"], "federation.min_clients=6"),
        (["--federation.eval_every", "0"], "federation.eval_every=0"),
        (["--federation.checkpoint_every", "0"], "federation.checkpoint_every=0"),
        (["--federation.clients_per_round", "11"], "federation.clients_per_round=11 exceeds the 10 clients"),
        (["--trainer.max_epochs", "0"], "trainer.max_epochs=0"),
        (["--trainer.max_epochs", "-1"], "trainer.max_epochs=-1"),
        (["--trainer.max_steps", "0"], "trainer.max_steps=0"),
        (["--trainer.limit_train_batches", "1.5"], "trainer.limit_train_batches=1.5"),
        (["--model.optimizer.init_args.lr", "-1"], "model.optimizer"),
        (["--model.optimizer.init_args.lr", ".inf"], "model.optimizer.init_args.lr=inf"),
        (["--model.network", "no_such_net"], "model.network='no_such_net'"),
        (["--model.num_classes", "7"], "model.num_classes=7"),
        (["--data.init_args.batch_size", "0"], "data.batch_size=0"),
        (["--data.init_args.dirichlet_alpha", "0"], "data.dirichlet_alpha=0"),
        (["--federation.algorithm.init_args.lam", "1.5"], "federation.algorithm.lam=1.5"),
        (["--federation.algorithm.init_args.alpha_init", "2"], "federation.algorithm.alpha_init=2"),
        (["--federation.algorithm.init_args.num_routed", "0"], "federation.algorithm.num_routed=0"),
        (["--federation.algorithm.init_args.top_k", "4"], "federation.algorithm.top_k=4"),
        (["--federation.algorithm.init_args.relevance_temperature", "0"], "federation.algorithm.relevance_temperature=0"),
        (["--federation.algorithm.init_args.gate_lr", "-1"], "federation.algorithm.gate_lr=-1"),
        (["--federation.algorithm.init_args.gate_network", "no_such_net"], "federation.algorithm.gate_network="),
        (["--federation.algorithm", "FedProx", "--federation.algorithm.mu", "-1"], "federation.algorithm.mu=-1"),
        pytest.param(["--trainer.accelerator", "gpu"], "no CUDA GPU; available: cpu",
                     marks=pytest.mark.skipif(GPU, reason="this machine has a GPU")),
        (["--trainer.accelerator", "tpu"], "trainer.accelerator='tpu'"),
        (["--trainer.devices", "2"], "one device"),
        (["--trainer.callbacks", "lightning.pytorch.callbacks.EarlyStopping"], "trainer.callbacks has no effect"),
        (["--trainer.check_val_every_n_epoch", "2"], "use federation.eval_every"),
        (["--trainer.strategy", "horovod"], "trainer.strategy='horovod' is not a Lightning strategy"),
        (["--trainer.logger", "lightning.pytorch.loggers.CSVLogger"], "trainer.logger takes true or false"),
        (["--trainer.enable_checkpointing", "false"], "federation.checkpoint_every"),
        (["--seed_everything", "false"], "seed_everything=false"),
        (["--ckpt_path", "best"], "--ckpt_path best"),
        (["--ckpt_path", "nowhere.ckpt"], "--ckpt_path nowhere.ckpt"),
    ],
)
def test_bad_input_is_one_error_line_naming_the_key_and_writes_nothing(tmp_path, capsys, args, expected):
    assert fit(tmp_path / "run", *args) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0]
    assert not (tmp_path / "run").exists()


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: 1\nfederation: [rounds\n")
    assert main(["fit", "--config", str(bad)]) == 2
    line = one_error_line(capsys)
    assert str(bad) in line and "line 3" in line
    assert main(["fit", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in one_error_line(capsys)


def test_run_folder_blocked_by_a_file_is_one_line_and_untouched(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for run in (blocker, blocker / "run"):
        assert fit(run, "--federation.rounds", "1") == 2
        assert "is a file, not a folder" in one_error_line(capsys)
    assert blocker.read_text() == "mine"


def test_read_only_run_folder_is_one_line(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway: report the folder as a read-only mount would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder else real(p, mode))
    try:
        assert fit(folder / "run", "--federation.rounds", "1") == 2
        assert f"cannot write in {folder} (read-only or no permission)" in one_error_line(capsys)
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_evaluating_without_a_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["test", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert "needs --ckpt_path" in one_error_line(capsys)
    assert main(["validate", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"]) == 2
    assert "last.ckpt does not exist" in one_error_line(capsys)


def _femnist_args(data_dir, run_dir, *extra):
    return ["fit", "--config", str(ROOT / "experiments" / "femnist" / "fedmoe.yaml"),
            "--data.init_args.data_dir", str(data_dir), "--trainer.default_root_dir", str(run_dir), *FAST, *extra]


def test_missing_data_dir_names_the_path_and_how_to_get_it(tmp_path, capsys):
    assert main(_femnist_args(tmp_path / "nowhere", tmp_path / "run")) == 2
    line = one_error_line(capsys)
    assert "nowhere" in line and "leaf" in line.lower()
    assert not (tmp_path / "run").exists()


def test_more_clients_than_writers_states_the_arithmetic(tmp_path, capsys, femnist_dir):
    args = _femnist_args(femnist_dir, tmp_path / "run", "--data.init_args.num_clients", "10")
    assert main(args) == 2
    assert "writers" in one_error_line(capsys)


def test_cifar_missing_data_is_one_line(tmp_path, capsys):
    args = ["fit", "--config", str(ROOT / "experiments" / "cifar10" / "fedavg.yaml"),
            "--data.init_args.data_dir", str(tmp_path / "empty"), "--trainer.default_root_dir", str(tmp_path / "r")]
    assert main(args) == 2
    assert "empty" in one_error_line(capsys)


# -- real processes: Ctrl-C and a kill during a checkpoint write ---------------------------------------

def _env() -> dict[str, str]:
    """The child computes with this process's torch thread count: bit-identical comparisons with runs
    made in this process need the same reduction order."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT / "src")}


def test_ctrl_c_prints_one_line_with_the_checkpoint_and_the_resume_command(tmp_path):
    run = tmp_path / "run"
    args = ["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(run), *FAST, "--federation.rounds", "200"]
    # SIGINT back to its default in the child: a shell starting this suite in the background ignores
    # it, and a process that inherits an ignored SIGINT never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "fedmoe.cli", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert len(lines) == 1, err
    match = re.search(r"the last checkpoint is (\S+) \(round (\d+)\); resume with: (.*)$", lines[0])
    assert match, lines[0]
    assert Path(match.group(1)) == run / "checkpoints" / "last.ckpt"
    assert load_checkpoint(match.group(1))["round"] == int(match.group(2))
    assert json.loads((run / "summary.json").read_text())["rounds"] == int(match.group(2))
    assert match.group(3).startswith("python -m fedmoe.cli fit ") and match.group(3).endswith("--ckpt_path last")


KILL_DURING_SECOND_SAVE = """
import os, signal, sys, torch
save, calls = torch.save, []
def killed_while_saving(obj, f, *a, **k):
    calls.append(1)
    if len(calls) == 2:
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *a, **k)
torch.save = killed_while_saving
from fedmoe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_run_killed_during_a_checkpoint_write_resumes_bit_identical_without_temp_files(tmp_path, full2):
    run = tmp_path / "run"
    args = ["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(run), *FAST, "--federation.rounds", "2"]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["round"] == 1
    assert list((run / "checkpoints").glob(".last.ckpt.*.tmp")), "the kill should leave a temp file"
    assert main([*args, "--ckpt_path", "last"]) == 0
    assert_same_run(load_checkpoint(full2 / "checkpoints" / "last.ckpt"), load_checkpoint(run / "checkpoints" / "last.ckpt"))
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
