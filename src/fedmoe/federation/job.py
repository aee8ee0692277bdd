"""A federated job built from a ``python -m fedmoe.cli`` config, without running it: the model, the
data (set up), the local training settings and the federation (rounds, sampling, algorithm), as
``fit`` would build them. The Flower server and every Flower client build the same job from the
same config; a library user drives it with any executor or loop of their own.

The config is parsed by the project's own command line (so defaults, checks and error messages are
the same as ``fit``'s); ``seed_everything`` seeds torch before the model is built, so every process
that builds the job from the same config starts from the same initial weights.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fedmoe.errors import ConfigError, DataError


@dataclass
class FederatedJob:
    """The objects a config describes, as ``fit`` would build them."""

    module: Any
    """The client LightningModule (its ``net`` travels)."""
    datamodule: Any
    """The federated data module (set up: its splits are built)."""
    settings: Any
    """:class:`fedmoe.federation.runner.RunnerSettings` from the ``trainer:`` section."""
    federation: Any
    """:class:`fedmoe.federation.loop.Federation`: rounds, sampling and the algorithm."""
    seed: int
    run_dir: Path
    """``trainer.default_root_dir``."""
    config_yaml: str
    """The resolved config (every default filled in), which rebuilds the same job."""

    @property
    def num_clients(self) -> int:
        return len(self.datamodule.splits.client_train)


def build_job(config: str | Path, overrides: Sequence[str] = (), data_dir: str | None = None) -> FederatedJob:
    """The job of a config file plus command-line style ``overrides`` (``["--federation.rounds", "2"]``).

    ``data_dir`` replaces ``data.data_dir`` (a client machine keeps its data in its own folder).
    A bad config raises :class:`ConfigError` (or exits with code 2 after printing one ``error:`` line,
    as ``fit`` does for argument errors).
    """
    from fedmoe.cli import build_cli_class, check_config_files, check_labels, check_optimizer

    args = ["--config", str(config), *overrides]
    if data_dir is not None:
        args += ["--data.init_args.data_dir", str(data_dir)]
    cli_class = build_cli_class(args, check_config_files(args))
    cli_class._argv = args
    argv, sys.argv = sys.argv, sys.argv[:1]  # a Flower process's own arguments are not the config's
    try:
        cli = cli_class(args=args, run=False)
    finally:
        sys.argv = argv
    cfg = cli.config
    seed = cfg.get("seed_everything")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(
            f"seed_everything={seed!r}: a Flower job needs a fixed integer seed (every process builds the same "
            "initial model and samples the same clients from it)"
        )
    dumped = cfg.clone()
    for key in ("config", "__path__"):
        if key in dumped:
            del dumped[key]
    yaml_text = cli.parser.dump(dumped, skip_none=False, skip_check=True)
    datamodule = cli.datamodule
    datamodule.setup("fit")
    federation = cli.config_init["federation"]
    n = len(datamodule.splits.client_train)
    if federation.clients_per_round > n:
        raise DataError(f"federation.clients_per_round={federation.clients_per_round} exceeds the {n} clients of the data")
    check_optimizer(cli.model)  # the checks fit makes before round 1
    check_labels(datamodule.splits, cli.model)
    return FederatedJob(
        module=cli.model,
        datamodule=datamodule,
        settings=cli.trainer,
        federation=federation,
        seed=int(seed),
        run_dir=Path(cfg.get("trainer.default_root_dir") or "runs/default"),
        config_yaml=yaml_text,
    )


def build_job_from_text(yaml_text: str, overrides: Sequence[str] = (), data_dir: str | None = None) -> FederatedJob:
    """:func:`build_job` of a config given as YAML text (how a config travels in a Flower run)."""
    with tempfile.TemporaryDirectory(prefix="fedmoe-flower-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml_text)
        return build_job(path, overrides, data_dir)
