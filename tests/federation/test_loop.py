"""The round loop on scikit-learn's digits with the real client module and executor."""

import logging
import math

import pytest
import torch

from fedmoe.algorithms.fedavg import FedAvg
from fedmoe.algorithms.fedmoe import FedMoE
from fedmoe.algorithms.fusion import num_bytes
from fedmoe.data.digits import DigitsDataModule
from fedmoe.data.federated import ArrayDataset
from fedmoe.errors import ConfigError, RoundError
from fedmoe.federation.loop import FederatedLoop, Federation
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier


class ExplodingDataset(ArrayDataset):
    def __getitems__(self, indices):
        raise RuntimeError("disk vanished")


class FaultyDigits(DigitsDataModule):
    """Digits where client 0 has NaN inputs and client 1's data cannot be read."""

    def build(self):
        splits = super().build()
        c0 = splits.client_train[0]
        splits.client_train[0] = ArrayDataset(torch.full_like(c0.x, float("nan")), c0.y, c0.index)
        c1 = splits.client_train[1]
        splits.client_train[1] = ExplodingDataset(c1.x, c1.y, c1.index)
        return splits


def _loop(tmp_path, algorithm=None, dm=None, **fed):
    torch.manual_seed(0)
    module = Classifier("digits_cnn", 10, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    federation = Federation(algorithm=algorithm or FedAvg(), progress=False, **fed)
    return FederatedLoop(federation, module, dm or DigitsDataModule(num_clients=6), RunnerSettings(max_epochs=1),
                         run_dir=tmp_path / "run", seed=0, config={"k": 1})


def test_fedavg_rounds_log_metrics_bytes_and_checkpoint(tmp_path):
    loop = _loop(tmp_path, rounds=2, clients_per_round=3)
    summary = loop.fit()
    assert summary["rounds"] == 2 and len(loop.history) == 2
    row = loop.history[-1]
    model_bytes = num_bytes(loop.template)
    assert row["comm/bytes_up"] == 3 * model_bytes and row["comm/bytes_down"] == 3 * model_bytes
    for key in ("server/test_acc", "server/val_loss", "clients/acc_mean", "clients/acc_min", "time/round_s"):
        assert math.isfinite(row[key])
    assert row["clients/acc_min"] <= row["clients/acc_mean"] <= row["clients/acc_max"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    lines = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("round,")


def test_failing_and_non_finite_clients_are_dropped_and_logged(tmp_path, caplog):
    loop = _loop(tmp_path, dm=FaultyDigits(num_clients=6), rounds=1, clients_per_round=6, min_clients=2)
    with caplog.at_level(logging.WARNING):
        loop.fit()
    row = loop.history[0]
    assert row["clients/ok"] == 4 and row["clients/dropped"] == 2
    text = caplog.text
    assert "client 0 returned non-finite weights" in text and "disk vanished" in text
    assert all(torch.isfinite(v).all() for v in loop.state["global"].values() if v.is_floating_point())


def test_round_stops_when_too_few_clients_survive(tmp_path):
    loop = _loop(tmp_path, dm=FaultyDigits(num_clients=6), rounds=1, clients_per_round=6, min_clients=5)
    with pytest.raises(RoundError, match=r"only 4 of 6 clients survived \(federation.min_clients=5\)"):
        loop.fit()


def test_fedmoe_personalises_only_sampled_clients(tmp_path):
    loop = _loop(tmp_path, algorithm=FedMoE(num_routed=2, num_main=1), rounds=2, clients_per_round=2)
    loop.fit()
    sampled = {int(c) for row in loop.history for c in row["clients"].split()}
    assert set(loop.store.weights) == sampled
    row = loop.history[-1]
    assert row["comm/bytes_down"] == 2 * num_bytes(loop.template)
    assert abs(sum(row[f"fedmoe/utilisation/expert_{e}"] for e in (1, 2)) - 1) < 1e-6


def test_fedmoe_validation_is_measured_once_and_equals_the_server_model_on_val(tmp_path, monkeypatch):
    loop = _loop(tmp_path, algorithm=FedMoE(num_routed=2, num_main=1, iterations=2), rounds=1, clients_per_round=2)
    from fedmoe.federation.context import EngineContext

    calls = []
    evaluate = EngineContext.evaluate
    monkeypatch.setattr(EngineContext, "evaluate", lambda ctx, module, data: calls.append(data) or evaluate(ctx, module, data))
    loop.fit()
    val = [d for d in calls if d is loop.ctx.val]
    assert len(val) == 2  # one per Fed-MoE iteration, none more by the loop
    direct = evaluate(loop.ctx, loop.algo.server_module(loop.state, loop.ctx), loop.ctx.val)
    assert loop.history[-1]["server/val_loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert loop.history[-1]["server/val_acc"] == pytest.approx(direct["acc"])


def test_fedmoe_without_best_iteration_revert_logs_the_best_iterations_test_accuracy(tmp_path):
    algo = FedMoE(num_routed=2, num_main=1, iterations=2, keep_best_iteration=False)
    loop = _loop(tmp_path, algorithm=algo, rounds=1, clients_per_round=2)
    loop.fit()
    assert 0.0 <= loop.history[-1]["server/best_iteration_test_acc"] <= 1.0
    reverting = _loop(tmp_path / "b", algorithm=FedMoE(num_routed=2), rounds=1, clients_per_round=2)
    reverting.fit()
    assert "server/best_iteration_test_acc" not in reverting.history[-1]


def test_persistent_optimizer_state_is_kept_per_client(tmp_path):
    loop = _loop(tmp_path, rounds=1, clients_per_round=2, persistent_optimizer=True)
    loop.fit()
    assert len(loop.store.optimizers) == 2
    assert not loop.store.weights


class CrashingDigits(DigitsDataModule):
    """Digits whose client data raises KeyboardInterrupt (like a kill) on the n-th batch read."""

    def __init__(self, crash_at: int, **kw):
        super().__init__(**kw)
        self.crash_at = crash_at

    def build(self):
        splits = super().build()
        counter = self.counter = {"reads": 0}
        crash_at = self.crash_at

        class Dataset(ArrayDataset):
            def __getitems__(self, indices):
                counter["reads"] += 1
                if counter["reads"] == crash_at:
                    raise KeyboardInterrupt("killed")
                return super().__getitems__(indices)

        splits.client_train = [Dataset(d.x, d.y, d.index, d.transform) for d in splits.client_train]
        return splits


def test_run_killed_mid_round_resumes_bit_identical(tmp_path):
    full = _loop(tmp_path / "a", algorithm=FedMoE(num_routed=2), rounds=3, clients_per_round=3)
    full.fit()
    counting = CrashingDigits(crash_at=-1, num_clients=6)
    _loop(tmp_path / "c", algorithm=FedMoE(num_routed=2), rounds=2, clients_per_round=3, dm=counting).fit()
    reads_in_two_rounds = counting.counter["reads"]
    crashing = _loop(tmp_path / "b", algorithm=FedMoE(num_routed=2), rounds=3, clients_per_round=3,
                     dm=CrashingDigits(crash_at=reads_in_two_rounds + 3, num_clients=6))
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert crashing.round == 2
    rows = (crashing.run_dir / "clients.csv").read_text().splitlines()
    with open(crashing.run_dir / "clients.csv", "a") as f:  # as if round 3 had been logged, its last row cut
        f.write("\n".join(["3" + r[1:] for r in rows[1:3]] + [rows[3][:7]]))
    resumed = _loop(tmp_path / "b", algorithm=FedMoE(num_routed=2), rounds=3, clients_per_round=3)
    resumed.fit(ckpt_path=resumed.ckpt_path)
    assert (resumed.run_dir / "clients.csv").read_text() == (full.run_dir / "clients.csv").read_text()
    for key, value in full.state["moe"].items():
        assert torch.equal(value, resumed.state["moe"][key]), key
    for cid, weights in full.store.weights.items():
        assert all(torch.equal(v, resumed.store.weights[cid][k]) for k, v in weights.items())
    drop_time = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert drop_time(full.history) == drop_time(resumed.history)


def test_evaluating_more_or_less_often_does_not_change_training(tmp_path):
    every = _loop(tmp_path / "a", rounds=3, clients_per_round=2, eval_every=1)
    every.fit()
    rarely = _loop(tmp_path / "b", rounds=3, clients_per_round=2, eval_every=3, client_eval=False)
    rarely.fit()
    for key, value in every.state["global"].items():
        assert torch.equal(value, rarely.state["global"][key]), key


def test_run_failing_in_its_first_round_leaves_no_run_folder(tmp_path):
    loop = _loop(tmp_path, dm=FaultyDigits(num_clients=6), rounds=2, clients_per_round=6, min_clients=5)
    with pytest.raises(RoundError):
        loop.fit(config_yaml="k: 1\n")
    assert not (tmp_path / "run").exists()


def test_resume_with_fewer_rounds_is_refused_before_any_write(tmp_path):
    _loop(tmp_path, rounds=2, clients_per_round=2).fit()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    short = _loop(tmp_path, rounds=1, clients_per_round=2)
    with pytest.raises(ConfigError, match=r"federation.rounds=1 but .* has already done 2 rounds"):
        short.fit(ckpt_path=short.ckpt_path)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_logger_false_writes_no_events_but_the_metrics(tmp_path):
    loop = _loop(tmp_path, rounds=1, clients_per_round=2)
    loop.settings = RunnerSettings(max_epochs=1, logger=False)
    loop.fit()
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"metrics.csv", "summary.json", "checkpoints"} <= names
    assert not [n for n in names if n.startswith("events.out.tfevents")]


def test_tensorboard_every_n_rounds_and_the_last_while_metrics_keep_every_round(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedmoe.federation.recorder import RoundRecorder

    rec = RoundRecorder(tmp_path, every=2, last_round=5)
    for r in range(1, 6):
        rec.log(r, {"x": float(r)})
    rec.close()
    steps = [e.step for e in EventAccumulator(str(tmp_path)).Reload().Scalars("x")]
    assert steps == [2, 4, 5]
    assert len((tmp_path / "metrics.csv").read_text().strip().splitlines()) == 6
