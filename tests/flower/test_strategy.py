"""The Flower strategy and ClientApp drive the engine's algorithms unchanged: over a loopback grid
(every message through the real ClientApp, in this process) they give the sequential executor's
weights bit for bit, for FedAvg, FedProx and Fed-MoE with its per-client Stage C payloads."""

import pytest
import torch

from fedmoe.errors import ConfigError, RoundError
from fedmoe.flower.client import client_app
from fedmoe.federation.job import build_job
from fedmoe.flower.server import run_server
from fedmoe.flower.strategy import weights_digest

FEDMOE = {"class_path": "fedmoe.algorithms.fedmoe.FedMoE",
          "init_args": {"num_routed": 2, "num_main": 1, "lam": 0.5, "server_epochs": 1}}
FEDPROX = {"class_path": "fedmoe.algorithms.fedprox.FedProx", "init_args": {"mu": 0.5}}


def flower_run(fl, config, partitions=(0, 1, 2), fail=frozenset(), connect_timeout=5.0):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        job = build_job(config)
        grid = fl.LoopbackGrid(client_app(job.config_yaml), list(partitions), set(fail))
        return run_server(grid, job, output_dir=config.parent / "flower", connect_timeout=connect_timeout), grid
    finally:
        torch.set_num_threads(threads)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algorithm", [None, FEDPROX, FEDMOE], ids=["fedavg", "fedprox", "fedmoe"])
def test_strategy_over_loopback_equals_the_sequential_executor_bit_for_bit(fl, tmp_path, algorithm):
    config = fl.write_config(tmp_path, algorithm, clients=3, per_round=2, rounds=2)
    loop = fl.sequential_run(config)
    run, grid = flower_run(fl, config)
    if "global" in loop.state:
        expected = loop.state["global"]
    else:
        expected = {k: v for k, v in loop.algo.server_module(loop.state, loop.ctx).state_dict().items()}
    assert same_weights(run.strategy.server_weights(), expected)
    assert run.digest == weights_digest(expected)
    assert [row["clients"] for row in run.strategy.history] == [row["clients"] for row in loop.history]
    if algorithm is FEDMOE:  # each client's Stage C model is what it trains from in its next round
        for cid, weights in loop.store.weights.items():
            assert same_weights(run.strategy.store.get_weights(cid), weights)
    assert (tmp_path / "flower" / "server_weights.safetensors").is_file()
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train) == 4 and all(m.metadata.group_id in ("1", "2") for m in train)


def test_fedprox_plan_carries_the_proximal_term_without_a_second_copy_of_the_weights(fl, tmp_path):
    config = fl.write_config(tmp_path, FEDPROX, clients=3, per_round=2, rounds=1)
    run, grid = flower_run(fl, config)
    content = next(m for m in grid.sent if m.metadata.message_type == "train").content
    assert "plan-objects" in content["task"] and "regularizer-tensors" not in content
    assert len(content["task"]["plan-objects"]) < 2000


def test_a_failed_node_is_dropped_and_min_clients_still_holds(fl, tmp_path):
    config = fl.write_config(tmp_path, clients=3, per_round=3, rounds=1)
    run, _ = flower_run(fl, config, fail={1})
    row = run.strategy.history[0]
    assert row["clients/ok"] == 2 and row["clients/dropped"] == 1
    strict = fl.write_config(tmp_path, clients=3, per_round=3, rounds=1, min_clients=3)
    with pytest.raises(RoundError, match=r"round 1: only 2 of 3 clients survived.*1 \(RuntimeError: node lost\)"):
        flower_run(fl, strict, fail={1})


def test_clients_without_a_supernode_are_named_after_the_connect_timeout(fl, tmp_path):
    config = fl.write_config(tmp_path, clients=3, per_round=2, rounds=1)
    with pytest.raises(ConfigError, match=r"1 of 3 clients have no SuperNode \(partition-id 2\)"):
        flower_run(fl, config, partitions=(0, 1), connect_timeout=0.2)


def test_a_node_whose_partition_is_not_a_client_is_refused(fl, tmp_path):
    config = fl.write_config(tmp_path, clients=3, per_round=2, rounds=1)
    with pytest.raises(ConfigError, match=r"node 1007 has partition-id=7, which is not a client of the data \(0\.\.2\)"):
        flower_run(fl, config, partitions=(0, 1, 7))


def test_server_and_client_evaluation_match_the_engine_loop(fl, tmp_path):
    config = fl.write_config(tmp_path, clients=3, per_round=2, rounds=2, eval_every=1, client_eval=True)
    loop = fl.sequential_run(config)
    run, grid = flower_run(fl, config)
    assert sum(m.metadata.message_type == "evaluate" for m in grid.sent) == 4
    keys = ("server/val_loss", "server/val_acc", "server/test_loss", "server/test_acc",
            "clients/acc_mean", "clients/acc_min", "clients/acc_max")
    for ours, engine in zip(run.strategy.history, loop.history, strict=True):
        assert {k: ours[k] for k in keys} == pytest.approx({k: engine[k] for k in keys}, abs=1e-6)


def test_persistent_optimizers_stay_on_the_nodes_and_match_the_engine(fl, tmp_path):
    config = fl.write_config(tmp_path, clients=2, per_round=2, rounds=3, optimizer="torch.optim.Adam", lr=0.01,
                             persistent_optimizer=True)
    loop = fl.sequential_run(config)
    run, grid = flower_run(fl, config, partitions=(0, 1))
    assert same_weights(run.strategy.server_weights(), loop.state["global"])
    assert all("fedmoe-client" in ctx.state for ctx in grid.contexts.values())
    assert not any("optimizer" in key for m in grid.sent for key in m.content)


def test_a_disk_client_store_keeps_each_fedmoe_client_in_one_file_of_the_output_folder(fl, tmp_path):
    config = fl.write_config(tmp_path, FEDMOE, clients=3, per_round=2, rounds=2, client_store="disk")
    loop = fl.sequential_run(config)
    run, _ = flower_run(fl, config)
    files = sorted(p.name for p in (tmp_path / "flower" / "clients").iterdir())
    assert len(files) == len(loop.store.weights) and all(f.endswith(".safetensors") for f in files)
    for cid, weights in loop.store.weights.items():
        assert same_weights(run.strategy.store.get_weights(cid), weights)
