"""``python -m fedmoe.flower``: a fit config's job on Flower.

Commands (``--help`` on each):
  simulate      the job in Flower's in-process simulation (one virtual SuperNode per client)
  app           write a Flower App folder for the job (for ``flwr run`` on a deployment)
  certificates  a CA, the SuperLink's TLS certificate and SuperNode authentication keys
  check         whether a SuperLink answers and its certificate matches the root certificates
  run           check, then ``flwr run`` an app folder on a SuperLink

Options after the command's own are overrides of the config, as ``fit`` takes them
(``--federation.rounds 2``). Every mistake the user can make prints one ``error:`` line and exits
with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fedmoe.errors import FedMoEError

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as the rest of the command line
        sys.stderr.write(f"error: {self.prog}: {message} (see --help)\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fedmoe.flower", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("simulate", help="run the job in Flower's in-process simulation")
    s.add_argument("--config", required=True, help="a python -m fedmoe.cli fit config")
    s.add_argument("--output-dir", help="where the server weights and summary go (default <default_root_dir>/flower)")
    s.add_argument("--threads-per-client", type=int, help="torch threads in each client actor")
    s.add_argument("--cpus-per-client", type=float, help="CPUs Ray reserves per client actor (Flower's default: 2)")

    a = sub.add_parser("app", help="write a Flower App folder for the job")
    a.add_argument("--config", required=True, help="a python -m fedmoe.cli fit config")
    a.add_argument("--out", required=True, help="the app folder to write")
    a.add_argument("--name", default="fedmoe-job", help="the app's name")
    a.add_argument("--output-dir", help="absolute folder on the SuperLink's machine for the server's outputs")
    a.add_argument("--client-threads", type=int, default=0, help="torch threads per ClientApp process (0: default)")
    a.add_argument("--connect-timeout", type=float, default=120.0, help="seconds to wait for one SuperNode per client")

    c = sub.add_parser("certificates", help="a CA, the SuperLink's certificate and SuperNode keys")
    c.add_argument("--out", required=True, help="folder for ca.crt, server.pem, server.key and node keys")
    c.add_argument("--host", action="append", help="a name or IP address the SuperLink is reached by (repeat)")
    c.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make (node0, node0.pub, ...)")

    for name, text in (("check", "whether a SuperLink answers, with a certificate the root certificates vouch for"),
                       ("run", "check, then flwr run an app folder on a SuperLink")):
        r = sub.add_parser(name, help=text)
        if name == "run":
            r.add_argument("app", help="an app folder written by the app command")
            r.add_argument("--run-config", action="append", default=[], help="key=value overriding the app's run config")
        r.add_argument("--superlink", required=True, help="the SuperLink's address, host:port")
        r.add_argument("--root-certificates", help="the CA certificate that signed the SuperLink's certificate")
        r.add_argument("--insecure", action="store_true", help="a SuperLink started with --insecure (no TLS)")
        r.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the SuperLink to answer")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error prints one ``error:`` line and returns 2."""
    for noisy in ("lightning", "lightning.fabric", "lightning.pytorch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args, overrides = _parser().parse_known_args(argv)
    if overrides and args.command not in ("simulate", "app"):
        _parser().error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        return _COMMANDS[args.command](args, overrides)
    except FedMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _simulate(args, overrides: list[str]) -> int:
    from fedmoe.flower.simulation import backend_config, simulate

    run = simulate(args.config, overrides, output_dir=args.output_dir, threads_per_client=args.threads_per_client,
                   backend=backend_config(args.cpus_per_client))
    print(f"{len(run.strategy.history)} rounds; server weights {run.digest} in {run.output_dir}")
    return 0


def _app(args, overrides: list[str]) -> int:
    from fedmoe.flower.app import write_app
    from fedmoe.federation.job import build_job

    job = build_job(args.config, overrides)
    folder = write_app(args.out, job.config_yaml, name=args.name, output_dir=args.output_dir,
                       client_threads=args.client_threads, connect_timeout=args.connect_timeout)
    print(f"wrote {folder / 'pyproject.toml'} ({job.num_clients} clients: start one flower-supernode per client "
          f"with --node-config \"partition-id=<0..{job.num_clients - 1}>\")")
    return 0


def _certificates(args, overrides: list[str]) -> int:
    from fedmoe.flower.certificates import make_node_keys, make_tls

    files = make_tls(args.out, args.host or ["127.0.0.1", "localhost"])
    keys = [make_node_keys(args.out, f"node{i}")[0] for i in range(args.nodes)]
    print(f"wrote {files.ca_cert}, {files.server_cert}, {files.server_key}" + "".join(f", {k}, {k}.pub" for k in keys))
    return 0


def _check(args, overrides: list[str]) -> int:
    from fedmoe.flower.connection import check_superlink

    check_superlink(args.superlink, args.root_certificates, args.insecure, args.timeout)
    print(f"SuperLink {args.superlink} answers" + ("" if args.insecure else " with a certificate that matches"))
    return 0


def _run(args, overrides: list[str]) -> int:
    from fedmoe.errors import ConfigError
    from fedmoe.flower.connection import check_superlink, write_connection

    app = Path(args.app)
    if not (app / "pyproject.toml").is_file():
        raise ConfigError(f"{app} has no pyproject.toml: write the app folder with python -m fedmoe.flower app")
    check_superlink(args.superlink, args.root_certificates, args.insecure, args.timeout)
    with tempfile.TemporaryDirectory(prefix="fedmoe-flwr-home-") as home:
        write_connection(home, "fedmoe", args.superlink, args.root_certificates, args.insecure)
        env = {**os.environ, "FLWR_HOME": home, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "FLWR_TELEMETRY_ENABLED": "0"}
        cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(app), "fedmoe", "--stream"]
        for pair in args.run_config:
            cmd += ["--run-config", pair]
        return subprocess.call(cmd, env=env)


_COMMANDS = {"simulate": _simulate, "app": _app, "certificates": _certificates, "check": _check, "run": _run}


if __name__ == "__main__":
    sys.exit(main())
