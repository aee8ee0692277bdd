"""Wall time of one federated FedAvg round: the engine against a bare PyTorch loop.

Both sides run in this process on the same FEMNIST tensors, with the same network
(``FemnistCNN``), batch size 64, Adam (lr 3e-4, fresh per client), one local epoch per client,
per-client shuffled batches (``torch.randperm`` per epoch) with the same batch augmentation
(``femnist_train_transform``), and the same sample-weighted average of the clients' weights.

* engine: ``FederatedLoop.run_round`` (sampling, ``executors.Sequential`` driving
  ``LocalRunner``/Lightning Fabric, finiteness checks, FedAvg aggregation), then what
  ``FederatedLoop.fit`` does after each round: TensorBoard scalars and ``metrics.csv`` through
  ``RoundRecorder`` and the atomic checkpoint ``checkpoints/last.ckpt``.
* bare: for each client, load the global weights into one ``FemnistCNN``, train it with a plain
  loop, copy its weights out; then average them, weighted by the clients' sample counts.

Evaluation is excluded on both sides. A warm-up round of each side comes first, then ``--rounds``
measured rounds per side, interleaved engine, bare, engine, bare, ...; both sides are seeded
identically before each round. The thread count is left as torch sets it.

    python benchmarks/round_overhead.py --data-dir ../shared/data/femnist
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import fedmoe  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))

import numpy as np
import torch
import torch.nn.functional as F

from fedmoe.algorithms.fedavg import FedAvg
from fedmoe.data.femnist import FEMNISTDataModule
from fedmoe.federation.loop import FederatedLoop, Federation
from fedmoe.federation.recorder import RoundRecorder
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier
from fedmoe.models.vision import FemnistCNN

NUM_CLASSES = 62
BATCH_SIZE = 64
LR = 3e-4


def adam(params):
    return torch.optim.Adam(params, lr=LR)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EngineSide:
    """One FedAvg round of the engine, as ``FederatedLoop.fit`` runs it, without evaluation."""

    def __init__(self, datamodule: FEMNISTDataModule, clients: int, run_dir: Path) -> None:
        module = Classifier("femnist_cnn", NUM_CLASSES, optimizer=adam)
        fed = Federation(
            algorithm=FedAvg(),
            rounds=10**9,  # run_round evaluates at the last round; keep it out of reach
            clients_per_round=clients,
            eval_every=10**9,
            client_eval=False,
            progress=False,
        )
        self.loop = FederatedLoop(fed, module, datamodule, RunnerSettings(max_epochs=1), run_dir=run_dir)
        self.loop.setup()
        self.loop.state = self.loop.algo.init_server(self.loop.template, self.loop.ctx)
        self.recorder = RoundRecorder(self.loop.run_dir, 0, self.loop.history)
        self.last_loss = float("nan")

    def round(self, r: int) -> dict[str, float]:
        loop = self.loop
        t0 = time.perf_counter()
        row, images = loop.run_round(r)
        t1 = time.perf_counter()
        loop.round = r
        self.recorder.log(r, row, images)
        loop.history = self.recorder.history
        t2 = time.perf_counter()
        loop.save()
        t3 = time.perf_counter()
        self.last_loss = row["clients/train_loss"]
        return {"train": t1 - t0, "log": t2 - t1, "ckpt": t3 - t2}

    def close(self) -> None:
        self.recorder.close()


class BareSide:
    """The same round as a plain PyTorch loop: local training of every client, then the weighted mean."""

    def __init__(self, datasets, template: dict[str, torch.Tensor]) -> None:
        self.net = FemnistCNN(NUM_CLASSES)
        self.clients = [(ds.x, ds.y, ds.index, ds.transform) for ds in datasets]
        self.global_weights = {k: v.detach().clone() for k, v in template.items()}
        self.last_loss = float("nan")

    def round(self, r: int) -> dict[str, float]:
        t0 = time.perf_counter()
        net = self.net
        results, losses = [], []
        for x, y, index, transform in self.clients:
            net.load_state_dict(self.global_weights)
            net.train()
            opt = torch.optim.Adam(net.parameters(), lr=LR)
            total, count = 0.0, 0
            order = index[torch.randperm(len(index))]
            for start in range(0, len(order), BATCH_SIZE):
                rows = order[start : start + BATCH_SIZE]
                loss = F.cross_entropy(net(transform(x[rows])), y[rows])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                total += float(loss.detach())
                count += 1
            losses.append(total / max(count, 1))
            results.append(({k: v.detach().clone() for k, v in net.state_dict().items()}, len(index)))
        n_total = sum(n for _, n in results)
        new = {}
        for k, v in self.global_weights.items():
            if not v.is_floating_point():
                new[k] = v.clone()
                continue
            acc = torch.zeros_like(v)
            for weights, n in results:
                acc.add_(weights[k], alpha=n / n_total)
            new[k] = acc
        self.global_weights = new
        self.last_loss = sum(losses) / len(losses)
        return {"train": time.perf_counter() - t0}


def timed(side, r: int, seed: int) -> tuple[float, float, dict[str, float]]:
    """Wall and process CPU seconds of one round of ``side``."""
    gc.collect()
    seed_all(seed + r)
    c0, t0 = time.process_time(), time.perf_counter()
    parts = side.round(r)
    t1, c1 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0, parts


def profile_round(side, r: int, seed: int, top: int) -> str:
    gc.collect()
    seed_all(seed + r)
    prof = cProfile.Profile()
    prof.enable()
    side.round(r)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "femnist"),
                   help="FEMNIST LEAF folder (default: ../shared/data/femnist from the repository root)")
    p.add_argument("--clients", type=int, default=20, help="clients, all trained every round (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per side, at least 3 (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="engine run folder (default: a temporary folder)")
    p.add_argument("--profile", action="store_true", help="after measuring, profile one engine round")
    p.add_argument("--profile-top", type=int, default=30)
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be at least 3")

    t = time.perf_counter()
    dm = FEMNISTDataModule(
        data_dir=args.data_dir, num_clients=args.clients, writers_per_client=4, server_writers=10,
        probe_writers=1, batch_size=BATCH_SIZE,
    )
    dm.setup("fit")
    datasets = dm.splits.client_train
    print(f"FEMNIST: {args.clients} clients, {sum(len(d) for d in datasets)} training samples "
          f"(loaded in {time.perf_counter() - t:.1f} s); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory(prefix="round_overhead_") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        engine = EngineSide(dm, args.clients, run_dir)
        bare = BareSide(datasets, engine.loop.template)
        try:
            r = 1
            we, _, pe = timed(engine, r, args.seed)
            wb, _, _ = timed(bare, r, args.seed)
            print(f"warm-up     engine {we:7.3f} s   bare {wb:7.3f} s")
            rows = []
            for _ in range(args.rounds):
                r += 1
                we, ce, pe = timed(engine, r, args.seed)
                wb, cb, _ = timed(bare, r, args.seed)
                rows.append((we, wb, ce, cb))
                print(
                    f"round {r:3d}   engine {we:7.3f} s (train+aggregate {pe['train']:.3f}, log {pe['log']:.3f}, "
                    f"checkpoint {pe['ckpt']:.3f})   bare {wb:7.3f} s   ratio {we / wb:.3f}   "
                    f"CPU {ce:.1f} / {cb:.1f} s   train loss {engine.last_loss:.3f} / {bare.last_loss:.3f}"
                )
            if args.profile:
                r += 1
                print(f"\ncProfile of engine round {r}:")
                print(profile_round(engine, r, args.seed, args.profile_top))
        finally:
            engine.close()

    med = [statistics.median(col) for col in zip(*rows)]
    ratio = med[0] / med[1]
    pair_ratio = statistics.median(we / wb for we, wb, _, _ in rows)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print(f"median wall  engine {med[0]:.3f} s   bare {med[1]:.3f} s")
    print(f"median CPU   engine {med[2]:.3f} s   bare {med[3]:.3f} s   ratio {med[2] / med[3]:.3f}")
    print(f"median of per-round ratios (engine/bare): {pair_ratio:.3f}")
    print(f"round_overhead ratio (engine/bare, median): {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
