"""The Flower ``ServerApp``: builds the job from the config, runs :class:`AlgorithmStrategy` for
``federation.rounds`` rounds and writes the server's final weights and a summary.

Outputs (in the run config's ``output-dir``, default ``<trainer.default_root_dir>/flower``):
``server_weights.safetensors`` (the global model, or Fed-MoE's server mixture) and
``summary.json`` (the rounds' records, the client -> node map and the weights' SHA-256 digest).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmoe.errors import ConfigError, DataError
from fedmoe.federation.context import EngineContext
from fedmoe.flower.client import CONFIG_KEY
from fedmoe.federation.job import FederatedJob, build_job_from_text
from fedmoe.flower.strategy import AlgorithmStrategy, weights_digest

log = logging.getLogger(__name__)

#: run_config keys read by the ServerApp.
OUTPUT_KEY = "output-dir"
CONNECT_TIMEOUT_KEY = "connect-timeout"
ROUND_TIMEOUT_KEY = "round-timeout"


@dataclass
class ServerRun:
    """A finished Flower run: the strategy (final server state, store, history) and where its
    outputs were written."""

    strategy: AlgorithmStrategy
    job: FederatedJob
    output_dir: Path
    digest: str


def build_strategy(job: FederatedJob, store_root: Path | None = None) -> AlgorithmStrategy:
    """The strategy of a job, set up as the engine's loop sets itself up (frozen parameters,
    clients per round within the data's clients); ``store_root``: the disk store's folder, used when
    ``federation.client_store`` is ``disk``."""
    fed = job.federation
    if fed.clients_per_round > job.num_clients:
        raise DataError(f"federation.clients_per_round={fed.clients_per_round} exceeds the {job.num_clients} clients of the data")
    net = job.module.net
    template = {k: v.detach().clone() for k, v in net.state_dict().items()}
    ctx = EngineContext(job.module, job.datamodule, job.settings, template)
    frozen = fed.algorithm.frozen_keys(ctx)
    for name, param in net.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return AlgorithmStrategy(
        fed.algorithm, ctx, template, job.num_clients, fed.clients_per_round, sampling=fed.sampling, seed=job.seed,
        min_clients=fed.min_clients, store_dtype=fed.store_dtype,
        store_root=store_root if getattr(fed, "client_store", "memory") == "disk" else None,
        persistent_optimizer=fed.persistent_optimizer,
        evaluate_every=fed.eval_every, evaluate_last=fed.eval_last, client_eval=fed.client_eval, rounds=fed.rounds,
    )


def run_server(
    grid: Grid, job: FederatedJob, output_dir: Path | None = None, connect_timeout: float = 120.0,
    round_timeout: float = 3600.0,
) -> ServerRun:
    """Connect to the nodes, run the rounds, write the outputs (a disk client store in ``clients/``
    of the output folder)."""
    out = Path(output_dir) if output_dir is not None else job.run_dir / "flower"
    strategy = build_strategy(job, store_root=out / "clients")
    strategy.connect(grid, timeout=connect_timeout)
    strategy.start(grid, strategy.initial_arrays(), num_rounds=job.federation.rounds, timeout=round_timeout,
                   evaluate_fn=strategy.evaluate_server)
    digest = write_outputs(strategy, out)
    return ServerRun(strategy, job, out, digest)


def write_outputs(strategy: AlgorithmStrategy, folder: Path) -> str:
    """``server_weights.safetensors`` and ``summary.json`` in ``folder``; returns the weights' digest."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in strategy.server_weights().items()}
    save_file(weights, str(folder / "server_weights.safetensors"))
    digest = weights_digest(weights)
    summary = {
        "algorithm": type(strategy.algo).__name__,
        "rounds": len(strategy.history),
        "digest": digest,
        "nodes": {str(c): n for c, n in sorted(strategy.nodes.items())},
        "history": strategy.history,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return digest


def server_app(
    config_yaml: str | None = None, overrides: Sequence[str] = (), output_dir: str | Path | None = None,
    on_finish: Callable[[ServerRun], None] | None = None, job: FederatedJob | None = None,
) -> ServerApp:
    """A ServerApp for a config; ``config_yaml`` None reads it from the run config (``flwr run``).

    ``job`` (already built, in this process) replaces the config; ``on_finish`` receives the
    finished run (in-process simulations read the final state from it).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        built = job
        if built is None:
            text = config_yaml if config_yaml is not None else context.run_config.get(CONFIG_KEY)
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"the run config has no {CONFIG_KEY}: run an app written by python -m fedmoe.flower app")
            built = build_job_from_text(text, overrides)
        out = output_dir if output_dir is not None else context.run_config.get(OUTPUT_KEY) or None
        run = run_server(
            grid, built, Path(out) if out else None,
            connect_timeout=float(context.run_config.get(CONNECT_TIMEOUT_KEY, 120.0)),
            round_timeout=float(context.run_config.get(ROUND_TIMEOUT_KEY, 3600.0)),
        )
        log.info("fedmoe: %d rounds done; server weights %s in %s", len(run.strategy.history), run.digest, run.output_dir)
        if on_finish is not None:
            on_finish(run)

    return app
