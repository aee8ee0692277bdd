"""A fedmoe job in Flower's in-process simulation (``flwr.simulation.run_simulation``, Ray backend):
the ServerApp runs in a thread of this process, each client in a Ray actor, one virtual SuperNode
per client (``partition-id`` = client id).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from fedmoe.errors import RoundError
from fedmoe.flower.client import client_app
from fedmoe.federation.job import build_job
from fedmoe.flower.server import ServerRun, server_app


def backend_config(cpus_per_client: float | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Ray backend settings: CPUs reserved per client actor (None: Flower's default, 2) and CPUs
    Ray may use in all (None: the machine's)."""
    config: dict[str, Any] = {"init_args": {"logging_level": "error", "log_to_driver": False}}
    if num_cpus is not None:
        config["init_args"]["num_cpus"] = num_cpus
    if cpus_per_client is not None:
        config["client_resources"] = {"num_cpus": cpus_per_client, "num_gpus": 0.0}
    return config


def simulate(
    config: str | Path,
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    threads_per_client: int | None = None,
    backend: dict[str, Any] | None = None,
    verbose: bool = False,
) -> ServerRun:
    """Run a config's job in Flower's simulation and return the finished run.

    Args:
        config: a ``python -m fedmoe.cli`` config file.
        overrides: command-line style overrides (``["--federation.rounds", "2"]``).
        output_dir: where the server writes its weights and summary (default
            ``<trainer.default_root_dir>/flower``).
        threads_per_client: ``torch.set_num_threads`` in each client actor (None: torch's default).
        backend: Ray backend settings (:func:`backend_config`; None: Flower's defaults).
        verbose: Flower's debug logging.
    """
    from flwr.simulation import run_simulation

    job = build_job(config, overrides)
    finished: list[ServerRun] = []
    server = server_app(job=job, output_dir=output_dir, on_finish=finished.append)
    client = client_app(job.config_yaml, threads=threads_per_client)
    run_simulation(server, client, num_supernodes=job.num_clients, backend_config=backend or backend_config(),
                   verbose_logging=verbose)
    if not finished:
        raise RoundError("the Flower simulation ended before its last round (see Flower's log above)")
    return finished[0]
