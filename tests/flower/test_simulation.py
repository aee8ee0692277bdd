"""Flower's in-process simulation (run_simulation, Ray backend: clients in Ray actor processes),
started by ``python -m fedmoe.flower simulate``, gives the sequential executor's FedAvg weights on
digits bit for bit: the same plans, the same client step seeded by (seed, round, client id), exact
float32 transport, one torch thread on both sides, and the algorithm's aggregation over the results
in sampled order."""

import json

import pytest
import torch

from fedmoe.flower.__main__ import main
from fedmoe.flower.strategy import weights_digest

pytest.importorskip("ray")


def test_flower_simulation_equals_the_sequential_executor_for_fedavg_on_digits(fl, tmp_path, capsys):
    from safetensors.torch import load_file

    config = fl.write_config(tmp_path, clients=2, per_round=2, rounds=2)
    expected = fl.sequential_run(config).state["global"]
    out = tmp_path / "flower"
    assert main(["simulate", "--config", str(config), "--output-dir", str(out), "--threads-per-client", "1",
                 "--cpus-per-client", "2"]) == 0
    assert f"2 rounds; server weights {weights_digest(expected)}" in capsys.readouterr().out
    weights = load_file(str(out / "server_weights.safetensors"))
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    summary = json.loads((out / "summary.json").read_text())
    assert [row["clients/ok"] for row in summary["history"]] == [2, 2] and summary["nodes"].keys() == {"0", "1"}
