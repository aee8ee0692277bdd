"""Updates per second the expert coordinator applies, each persisted before it is acknowledged.

16 worker threads push Qwen2-0.5B-shaped adapters (24 layers, hidden 896, 2 KV heads of 64: q
896->896, k 896->128, v 896->128, o 896->896, r = 16, float32: 8.65 MB per update) to 3 experts in
FedAsync mode: each thread pulls its expert (``snapshot``), pushes an update against the version it
pulled, and repeats. Every update is checked, mixed exactly (the residual goes into the expert's
correction, re-compressed to ``--rank-budget`` when it exceeds budget + slack) and appended to the
expert's log with fsync before ``push`` returns. Rows:

- ``in memory, rank unbounded``: no store, a rank budget never reached: no SVD, but every
  correction grows by r per update (and each pull concatenates it);
- ``in memory``: no store, corrections re-compressed to ``--rank-budget`` (QR + SVD per layer);
- ``persisted``: the same on a store folder (``--dir``), fsync on: the figure of record;
- ``disk``: the fsynced write bandwidth of this folder for update-sized blobs, and the update rate
  that bandwidth allows (a ceiling for the first row).

Then the count check: applied + refused == pushed, and per expert the acknowledged sequence numbers
are 1..N with strictly increasing versions.

    OMP_NUM_THREADS=1 python benchmarks/coordinator.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

import torch

from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.experts import ExpertCoordinator, Update

EXPERTS = ("python", "sql", "docs")
SHAPES = {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896), "o_proj": (896, 896)}


def qwen_layers(num_layers: int = 24, r: int = 16) -> tuple[list[LoRALayer], dict[str, torch.Size]]:
    layers, shapes = [], {}
    for i in range(num_layers):
        for proj, (d_out, d_in) in SHAPES.items():
            name = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            layer = LoRALayer(name, f"{name}.base_layer.weight", f"{name}.lora_A.weight", f"{name}.lora_B.weight", 32 / r)
            layers.append(layer)
            shapes[layer.a_key] = torch.Size((r, d_in))
            shapes[layer.b_key] = torch.Size((d_out, r))
    return layers, shapes


def random_adapter(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()}


def run(coord: ExpertCoordinator, pool: list[dict], seconds: float, threads: int) -> tuple[float, list]:
    receipts, lock, stop = [], threading.Lock(), threading.Event()

    def work(i: int) -> None:
        name = EXPERTS[i % len(EXPERTS)]
        j = 0
        while not stop.is_set():
            snap = coord.snapshot(name, copy=False)
            r = coord.push(Update(name, f"worker{i}", snap.version, pool[(i + j) % len(pool)], num_samples=1))
            j += 1
            with lock:
                receipts.append((time.perf_counter(), r))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    end = time.perf_counter()
    return len(receipts) / (end - start), [r for _, r in receipts]


def check(coord: ExpertCoordinator, receipts: list) -> str:
    counts = coord.counts()
    assert counts["pushed"] == len(receipts), counts
    assert counts["applied"] + counts["pending"] + counts["refused"] == counts["pushed"], counts
    for name in EXPERTS:
        ok = sorted((r for r in receipts if r.expert == name and r.status == "applied"), key=lambda r: r.seq)
        assert [r.seq for r in ok] == list(range(1, len(ok) + 1)), f"{name}: sequence numbers have gaps"
        assert all(a.version < b.version for a, b in zip(ok, ok[1:])), f"{name}: versions not increasing"
    return f"pushed {counts['pushed']} = applied {counts['applied']} + pending {counts['pending']} + refused {counts['refused']}"


def disk_rate(folder: str, nbytes: int, reps: int = 8) -> float:
    """fsynced MB/s of update-sized appends in ``folder``."""
    blob = os.urandom(nbytes)
    path = os.path.join(folder, "disk-probe.bin")
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(reps):
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    dt = time.perf_counter() - start
    os.remove(path)
    return reps * nbytes / dt / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="duration of the persisted run (the others: a third)")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--rank-budget", type=int, default=16)
    p.add_argument("--rank-slack", type=int, default=0)
    p.add_argument("--dir", default=None, help="folder for the store (default: a temporary folder)")
    args = p.parse_args()
    layers, shapes = qwen_layers()
    pool = [random_adapter(shapes, s) for s in range(8)]
    nbytes = sum(t.numel() * t.element_size() for t in pool[0].values())
    settings = dict(
        mode="fedasync", mix=0.6, staleness="polynomial", rank_budget=args.rank_budget, rank_slack=args.rank_slack,
        history=8, snapshot_every=200,
    )
    print(f"{len(layers)} adapted layers, r=16, {nbytes / 1e6:.2f} MB per update, {args.threads} threads, "
          f"{len(EXPERTS)} experts, torch threads {torch.get_num_threads()}")
    folder = tempfile.mkdtemp(prefix="coordinator-bench-", dir=args.dir)
    try:
        disk = disk_rate(folder, nbytes)
        rows = [
            ("in memory, rank unbounded", None, {**settings, "rank_budget": 100_000}, args.seconds / 3),
            ("in memory", None, settings, args.seconds / 3),
            ("persisted", os.path.join(folder, "store"), settings, args.seconds),
        ]
        for label, root, kw, seconds in rows:
            coord = ExpertCoordinator(root, **kw)
            for name in EXPERTS:
                coord.register(name, random_adapter(shapes, 100), layers)
            rate, receipts = run(coord, pool, seconds, args.threads)
            summary = check(coord, receipts)
            m = coord.metrics(EXPERTS[0])
            coord.close()
            print(f"{label:26s}: {rate:6.1f} updates/s  ({summary}; expert {EXPERTS[0]}: version {m['version']}, "
                  f"staleness {m['staleness']}, compressions {m['compressions']}, max rank {max(m['rank'].values())}, "
                  f"energy dropped {m['energy_dropped']:.3g})")
        print(f"{'disk':26s}: {disk:6.1f} MB/s fsynced -> at most {disk * 1e6 / nbytes:.1f} updates/s of {nbytes / 1e6:.2f} MB")
        print(f"coordinator: {rate:.1f} updates/s (target >= 100)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
