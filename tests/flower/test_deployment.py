"""A real Flower deployment on loopback: flower-superlink with TLS certificates made here and
SuperNode authentication, two authenticated flower-supernode processes (one per client), and
``flwr run`` of the job's app for 2 rounds give the sequential executor's FedAvg weights bit for bit
(the same as the in-process simulation). Every process the test starts, and every process those
start (SuperExec, ServerApp, ClientApps), is stopped by its pid; none is left afterwards.

Slow (a deployed SuperNode starts a fresh ClientApp process, which builds the job, per message)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmoe.flower.app import write_app
from fedmoe.flower.certificates import make_node_keys, make_tls
from fedmoe.flower.connection import check_superlink, write_connection
from fedmoe.federation.job import build_job

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


class Processes:
    """Started processes; :meth:`stop_all` ends them and all their descendants by pid."""

    def __init__(self, folder: Path, env: dict) -> None:
        self.folder, self.env = folder, env
        self.procs: list[subprocess.Popen] = []
        self.seen: set[int] = set()

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        proc = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.folder)
        log.close()
        self.procs.append(proc)
        return proc

    def _family(self) -> list:
        family = []
        for proc in self.procs:
            try:
                parent = psutil.Process(proc.pid)
                family += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        self.seen.update(p.pid for p in family)
        return family

    def stop_all(self) -> None:
        for _ in range(3):  # children started while stopping are caught on the next pass
            family = self._family()
            for p in reversed(family):
                try:
                    p.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(family, timeout=15)
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=5)
        for proc in self.procs:
            proc.wait(timeout=5)

    def leftovers(self) -> list[int]:
        out = subprocess.run(["ps", "-eo", "pid=,stat="], capture_output=True, text=True).stdout.split("\n")
        alive = {int(parts[0]) for parts in (ln.split() for ln in out if ln.strip()) if not parts[1].startswith("Z")}
        return sorted(self.seen & alive)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_loopback_deployment_with_tls_and_supernode_auth_equals_the_sequential_executor(fl, tmp_path):
    config = fl.write_config(tmp_path, clients=2, per_round=2, rounds=2)
    expected = fl.sequential_run(config).state["global"]
    job = build_job(config)
    tls = make_tls(tmp_path / "certs")
    keys = [make_node_keys(tmp_path / "keys", f"node{i}") for i in range(2)]
    port = free_port()
    address = f"127.0.0.1:{port}"
    home = tmp_path / "flwr-home"
    write_connection(home, "loopback", address, tls.ca_cert)
    out = tmp_path / "server-out"
    app = write_app(tmp_path / "app", job.config_yaml, output_dir=str(out), client_threads=1, connect_timeout=600)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    procs = Processes(tmp_path, env)
    try:
        procs.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(tls.ca_cert),
                    "--ssl-certfile", str(tls.server_cert), "--ssl-keyfile", str(tls.server_key),
                    "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                    "--host", "127.0.0.1", "--port", str(port))

        def answers() -> bool:
            try:
                check_superlink(address, tls.ca_cert, timeout=2)
            except Exception:
                return False
            return True

        wait_for(answers, 120, "the SuperLink")
        for _, public in keys:
            reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public)], env=env,
                                 capture_output=True, text=True, timeout=120)
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
        for i, (private, _) in enumerate(keys):
            procs.start(f"supernode{i}", "flower-supernode", "--superlink", address, "--root-certificates",
                        str(tls.ca_cert), "--auth-supernode-private-key", str(private),
                        "--node-config", f"partition-id={i} num-partitions=2", "--port", str(free_port()))
        run = procs.start("flwr-run", "python", "-m", "fedmoe.flower", "run", str(app), "--superlink", address,
                          "--root-certificates", str(tls.ca_cert))
        run.wait(timeout=900)
        wait_for(lambda: (out / "summary.json").is_file(), 60, "the ServerApp's outputs")
        from safetensors.torch import load_file

        weights = load_file(str(out / "server_weights.safetensors"))
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
        assert "SuperNode authentication is disabled" not in (tmp_path / "superlink.log").read_text()
    finally:
        procs.stop_all()
    assert procs.leftovers() == [], "processes left running"
