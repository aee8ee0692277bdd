"""The same FedAvg job end to end with this engine (sequential executor) and with Flower 1.41's
simulation (default settings, and one thread per actor), side by side, with the digests of the
final weights and each side's time as a ratio to ours.

The job (the issue's): FEMNIST sample, ``--clients`` clients x ``--writers-per-client`` writers
(plus one server and one probe writer), the LEAF CNN, ``--rounds`` rounds of 1 local epoch, batch
32, SGD lr 0.05, all clients every round, no evaluation, checkpoint or logs. Every side runs in a
fresh Python process (imports excluded from its time; the time runs from building the job from the
config to the final weights, so Flower's includes starting Ray and its actors, which build the
job themselves), the sides interleaved ``--repeats`` times; medians are reported.

Sides:
  ours            FederatedLoop with the sequential executor, ``--threads`` torch threads
  flower-default  flwr.simulation.run_simulation with Flower's default backend (2 CPUs per actor)
                  and torch's default threads in the actors
  flower-1thread  1 CPU per actor (one actor per core) and one torch thread each

Equal digests mean bit-identical final weights (the sides agree when their torch thread counts
do: ``--threads 1`` against flower-1thread).

    python benchmarks/vs_peers.py --data-dir ../shared/data/femnist
    python benchmarks/vs_peers.py --data-dir ../shared/data/femnist --clients 4 --rounds 2 --repeats 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("fedmoe") is None:
    sys.path.insert(0, str(REPO / "src"))

SIDES = ("ours", "flower-default", "flower-1thread")


def job_config(args, folder: Path) -> Path:
    """The FedAvg job as a fit config."""
    import yaml

    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "default_root_dir": str(folder / "run"), "enable_progress_bar": False,
                    "logger": False},
        "model": {"network": "femnist_cnn", "num_classes": 62,
                  "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}},
        "data": {"class_path": "fedmoe.data.femnist.FEMNISTDataModule",
                 "init_args": {"data_dir": str(Path(args.data_dir).resolve()), "num_clients": args.clients,
                               "writers_per_client": args.writers_per_client, "server_writers": 1,
                               "probe_writers": 1, "batch_size": 32}},
        "federation": {"rounds": args.rounds, "clients_per_round": args.clients,
                       "algorithm": {"class_path": "fedmoe.algorithms.fedavg.FedAvg"},
                       "eval_every": None, "eval_last": False, "client_eval": False, "checkpoint_every": None,
                       "checkpoint_last": False, "write_logs": False, "progress": False},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_side(side: str, config: str, threads: int) -> dict:
    """One side in this process (called in a fresh process by :func:`main`)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import torch

    from fedmoe.federation.loop import FederatedLoop
    from fedmoe.flower.job import build_job
    from fedmoe.flower.simulation import backend_config, simulate
    from fedmoe.flower.strategy import weights_digest

    if side == "ours":
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        job = build_job(config)
        loop = FederatedLoop(job.federation, job.module, job.datamodule, settings=job.settings, run_dir=job.run_dir,
                             seed=job.seed)
        loop.fit()
        seconds = time.perf_counter() - t0
        digest = weights_digest(loop.state["global"])
    else:
        one = side == "flower-1thread"
        t0 = time.perf_counter()
        run = simulate(config, output_dir=Path(config).parent / side, threads_per_client=1 if one else None,
                       backend=backend_config(cpus_per_client=1 if one else None))
        seconds = time.perf_counter() - t0
        digest = run.digest
    return {"side": side, "seconds": seconds, "digest": digest}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data/femnist", help="a LEAF FEMNIST folder (train/, test/)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--writers-per-client", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of our side")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.config, args.threads)))
        return
    import torch

    with tempfile.TemporaryDirectory(prefix="vs-peers-") as tmp:
        config = job_config(args, Path(tmp))
        print(f"job: FedAvg, FEMNIST {args.clients} clients x {args.writers_per_client} writers, {args.rounds} rounds, "
              f"1 epoch, batch 32, SGD 0.05; machine: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}")
        times: dict[str, list[float]] = {s: [] for s in args.sides}
        digests: dict[str, set[str]] = {s: set() for s in args.sides}
        for r in range(args.repeats):
            for side in args.sides:
                cmd = [sys.executable, __file__, "--side", side, "--config", str(config), "--threads", str(args.threads)]
                env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                if out.returncode != 0 or not lines:
                    print(f"{side}: failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
                    continue
                res = json.loads(lines[-1])
                times[side].append(res["seconds"])
                digests[side].add(res["digest"])
                print(f"repeat {r + 1}: {side:15s} {res['seconds']:7.1f} s  digest {res['digest'][:16]}", flush=True)
        ours = statistics.median(times["ours"]) if times.get("ours") else None
        print("\nside             median s   / ours   digest")
        for side in args.sides:
            if not times[side]:
                continue
            med = statistics.median(times[side])
            ratio = f"{med / ours:7.2f}x" if ours else "      -"
            print(f"{side:15s} {med:9.1f} {ratio}   {', '.join(d[:16] for d in sorted(digests[side]))}")
        same = len(set().union(*digests.values())) == 1
        print(f"digests {'agree' if same else 'differ'} across sides")


if __name__ == "__main__":
    main()
