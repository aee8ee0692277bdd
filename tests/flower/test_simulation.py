"""Flower's in-process simulation (run_simulation, Ray backend: clients in Ray actor processes)
gives the sequential executor's FedAvg weights on digits bit for bit: the same plans, the same
client step seeded by (seed, round, client id), exact float32 transport, one torch thread on both
sides, and the algorithm's aggregation over the results in sampled order."""

import pytest
import torch

from fedmoe.flower.simulation import backend_config, simulate
from fedmoe.flower.strategy import weights_digest

pytest.importorskip("ray")


def test_flower_simulation_equals_the_sequential_executor_for_fedavg_on_digits(fl, tmp_path):
    config = fl.write_config(tmp_path, clients=2, per_round=2, rounds=2)
    expected = fl.sequential_run(config).state["global"]
    run = simulate(config, output_dir=tmp_path / "flower", threads_per_client=1,
                   backend=backend_config(cpus_per_client=2, num_cpus=2))
    weights = run.strategy.server_weights()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert run.digest == weights_digest(expected)
    assert [row["clients/ok"] for row in run.strategy.history] == [2, 2]
    assert (tmp_path / "flower" / "summary.json").is_file()
