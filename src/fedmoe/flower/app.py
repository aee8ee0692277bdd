"""The Flower App of a fedmoe job, for ``flwr run`` on a deployment.

``server`` and ``client`` are the components an app folder names
(``fedmoe.flower.app:server``, ``fedmoe.flower.app:client``); they read the job's config from the
run config's ``fedmoe-config`` (the resolved YAML, so every machine trains the same job without a
copy of the file). :func:`write_app` writes such a folder: a ``pyproject.toml`` with
``[tool.flwr.app]`` and the run config. fedmoe itself must be installed on every machine
(``pip install "fedmoe[flower]"``); run with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` /
``--disable-runtime-dependency-installation`` so that Flower installs nothing of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedmoe.errors import ConfigError
from fedmoe.flower.client import CONFIG_KEY, THREADS_KEY, client_app
from fedmoe.flower.server import CONNECT_TIMEOUT_KEY, OUTPUT_KEY, ROUND_TIMEOUT_KEY, server_app

server = server_app()
client = client_app()


def _toml_string(text: str) -> str:
    """A TOML basic string (escapes every character TOML requires, keeps the rest)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return '"' + re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'


def write_app(
    folder: str | Path,
    config_yaml: str,
    name: str = "fedmoe-job",
    output_dir: str | None = None,
    client_threads: int = 0,
    connect_timeout: float = 120.0,
    round_timeout: float = 3600.0,
) -> Path:
    """Write a Flower App folder (``pyproject.toml``) running the job of ``config_yaml``; returns it.

    Args:
        folder: the app folder (created; a ``pyproject.toml`` already there is replaced).
        config_yaml: the resolved config (:attr:`FederatedJob.config_yaml`).
        name: the app's name (lower case letters, digits and ``-``).
        output_dir: where the ServerApp writes the server weights and summary (an absolute path on
            the SuperLink's machine; None or "": ``<trainer.default_root_dir>/flower`` there).
        client_threads: torch threads per ClientApp process (0: torch's default).
        connect_timeout: seconds the ServerApp waits for a SuperNode per client.
        round_timeout: seconds the ServerApp waits for a round's replies.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ConfigError(f"app name {name!r}: use lower case letters, digits and '-'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values = {  # every key is written, so that flwr run --run-config can override any of them
        CONFIG_KEY: _toml_string(config_yaml),
        OUTPUT_KEY: _toml_string("" if output_dir is None else str(output_dir)),
        THREADS_KEY: str(int(client_threads)),
        CONNECT_TIMEOUT_KEY: repr(float(connect_timeout)),
        ROUND_TIMEOUT_KEY: repr(float(round_timeout)),
    }
    lines = [
        "# A fedmoe job as a Flower App (python -m fedmoe.flower app). fedmoe[flower] must be installed",
        "# on every machine; run with FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1.",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{name}"',
        'version = "1.0.0"',
        'description = "A fedmoe federated job"',
        'license = "MIT"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedmoe"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedmoe.flower.app:server"',
        'clientapp = "fedmoe.flower.app:client"',
        "",
        "[tool.flwr.app.config]",
        *(f'"{key}" = {value}' for key, value in values.items()),
        "",
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines))
    return folder

