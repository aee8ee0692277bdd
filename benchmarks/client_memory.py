"""Peak memory and checkpoint bytes per round against the total number of clients, at the same
clients per round: Fed-MoE with the FEMNIST CNN (the ``experiments/femnist/fedmoe.yaml`` preset,
persistent client Adam states) with 10 and with 100 clients.

Each configuration runs in a fresh process through the command line (``fedmoe.cli fit``), on a
synthetic FEMNIST data set in LEAF's JSON format written by this script (one writer per client, plus
server and probe writers; pixels 0/1, random labels), or on a LEAF folder given with ``--data-dir``.
The process reports

- its peak resident set (``VmHWM``), and the same minus the resident set after the imports;
- per round, the bytes its checkpoint wrote: ``checkpoints/last.ckpt`` plus, with the disk client
  store, the client files written in that round (the store's manifest entries of that version).

Then the ratios 100 clients / 10 clients of the peak resident set and of the mean checkpoint bytes
per round are printed for each client store (``--stores``, default ``disk``; target <= 1.10 for
both). With the ``memory`` store both grow with the clients sampled so far (a client holds 26 MB of
weights and 52 MB of Adam state here), which is what the disk store removes.

    OMP_NUM_THREADS=1 python benchmarks/client_memory.py
    OMP_NUM_THREADS=1 python benchmarks/client_memory.py --stores disk memory --rounds 4

Peak resident sets move by up to about 10% from run to run with glibc's default (dynamic) mmap
threshold: freed 26 MB tensors may stay in the heap. ``--mmap-threshold 1048576`` maps every
allocation above 1 MiB, so that freed tensors leave the resident set at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procstatus import status  # benchmarks/procstatus.py (this script's folder)

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "experiments" / "femnist" / "fedmoe.yaml"
SERVER_WRITERS, PROBE_WRITERS = 2, 1


def write_femnist(folder: Path, writers: int, train: int, test: int, seed: int = 0) -> None:
    """A LEAF-format FEMNIST folder (``train/`` and ``test/``, one JSON file each) with ``writers``
    writers of ``train`` + ``test`` samples: pixels 0 or 1, labels uniform over the 62 classes."""
    rng = random.Random(seed)
    names = [f"w{i:05d}" for i in range(writers)]
    for split, n in (("train", train), ("test", test)):
        data = {w: {"x": [[rng.getrandbits(1) for _ in range(784)] for _ in range(n)],
                    "y": [rng.randrange(62) for _ in range(n)]} for w in names}
        doc = {"users": names, "num_samples": [n] * writers, "user_data": data}
        (folder / split).mkdir(parents=True, exist_ok=True)
        with open(folder / split / f"all_data_0_niid_0_keep_0_{split}_9.json", "w") as f:
            json.dump(doc, f, separators=(",", ":"))


def child(args: argparse.Namespace) -> None:
    """One configuration: run the CLI, print one JSON line with the figures."""
    import torch

    from fedmoe import cli
    from fedmoe.federation import loop as loop_module

    torch.set_num_threads(1)
    after_imports = status("VmRSS")
    per_round: list[dict[str, int]] = []
    save = loop_module.FederatedLoop.save

    def measured_save(self) -> None:
        save(self)
        state = self.store.state_dict()
        files = sum(e["bytes"] for kind in state.get("files", {}).values() for e in kind.values()
                    if e["version"] == self.round)
        per_round.append({"round": self.round, "ckpt": self.ckpt_path.stat().st_size, "files": files,
                          "rss": status("VmRSS"), "peak": status("VmHWM")})

    loop_module.FederatedLoop.save = measured_save
    sys.argv = sys.argv[:1]  # the CLI parses its own list
    tick = time.perf_counter()
    code = cli.main([
        "fit", "--config", str(PRESET), "--trainer.default_root_dir", args.run_dir,
        "--trainer.max_epochs", "1", "--trainer.logger", "false",
        "--data.init_args.data_dir", args.data_dir, "--data.init_args.num_clients", str(args.clients),
        "--data.init_args.writers_per_client", str(args.writers_per_client),
        "--data.init_args.server_writers", str(SERVER_WRITERS), "--data.init_args.probe_writers", str(PROBE_WRITERS),
        "--data.init_args.batch_size", "16", "--data.init_args.server_batch_size", "16",
        "--federation.rounds", str(args.rounds), "--federation.clients_per_round", str(args.clients_per_round),
        "--federation.client_store", args.store, "--federation.progress", "false",
    ])
    if code != 0:
        raise SystemExit(f"fit failed with exit code {code}")
    print(json.dumps({"peak": status("VmHWM"), "after_imports": after_imports, "rounds": per_round,
                      "seconds": time.perf_counter() - tick}))


def measure(store: str, clients: int, args: argparse.Namespace, work: Path) -> dict:
    data = work / f"femnist{clients}"
    if args.data_dir is None and not data.is_dir():
        write_femnist(data, clients + SERVER_WRITERS + PROBE_WRITERS, args.train_samples, args.test_samples)
    run = work / f"run-{store}-{clients}"
    cmd = [sys.executable, __file__, "--child", "--store", store, "--clients", str(clients), "--run-dir", str(run),
           "--data-dir", str(args.data_dir or data), "--rounds", str(args.rounds),
           "--clients-per-round", str(args.clients_per_round), "--writers-per-client", str(args.writers_per_client)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    if args.mmap_threshold is not None:  # glibc: allocations above it are mapped, and unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{store} store, {clients} clients failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(run, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", nargs="+", default=["disk"], choices=["disk", "memory"])
    parser.add_argument("--totals", nargs=2, type=int, default=[10, 100], metavar=("FEW", "MANY"))
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers-per-client", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=16, help="per synthetic writer")
    parser.add_argument("--test-samples", type=int, default=2, help="per synthetic writer")
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="glibc's MALLOC_MMAP_THRESHOLD_ for the runs (default: glibc's dynamic threshold)")
    parser.add_argument("--data-dir", default=None, help="a LEAF FEMNIST folder instead of synthetic data")
    parser.add_argument("--work-dir", default=None, help="where data and runs go (default: a temporary folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"torch {torch.__version__}, one thread per run")
    print(f"Fed-MoE (femnist/fedmoe.yaml), FEMNIST CNN, {args.clients_per_round} clients per round, "
          f"{args.rounds} rounds, 1 local epoch; data: {args.data_dir or 'synthetic LEAF JSON'}; "
          f"MALLOC_MMAP_THRESHOLD_ {args.mmap_threshold if args.mmap_threshold is not None else 'unset'}")
    mib = 1 / 2**20
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        results: dict[tuple[str, int], dict] = {}
        for store in args.stores:
            for clients in args.totals:
                r = results[store, clients] = measure(store, clients, args, work)
                per_round = [x["ckpt"] + x["files"] for x in r["rounds"]]
                r["bytes_per_round"] = sum(per_round) / len(per_round)
                print(f"{store:>6} store, {clients:>3} clients: peak RSS {r['peak'] * mib:8.1f} MiB "
                      f"({(r['peak'] - r['after_imports']) * mib:7.1f} above the imports); checkpoint bytes per round "
                      + ", ".join(f"{x['ckpt'] * mib:.1f}+{x['files'] * mib:.1f}" for x in r["rounds"])
                      + f" MiB (last.ckpt+client files), mean {r['bytes_per_round'] * mib:.1f} MiB; {r['seconds']:.1f} s")
        few, many = args.totals
        for store in args.stores:
            a, b = results[store, few], results[store, many]
            print(f"client_memory {store} store, {many} vs {few} clients: peak RSS ratio {b['peak'] / a['peak']:.3f}, "
                  f"checkpoint bytes per round ratio {b['bytes_per_round'] / a['bytes_per_round']:.3f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
