"""Server-side cost of exact LoRA aggregation: FedEx-LoRA (residual computed and folded into the base
weights) vs FedIT (means of A and B), on adapters shaped like Qwen2-0.5B.

10 clients, 24 decoder layers, hidden 896 with 2 KV heads of 64: q 896->896, k 896->128,
v 896->128, o 896->896, rank 16, float32, random tensors, unequal sample counts. Rows:

- ``fedit``: ``fedit_aggregate`` (new A, B and head).
- ``fedex``: ``fedex_aggregate``: FedIT plus R = sum_{i<m} p_i (B_i - B_m)(A_i - A_bar) from its
  factors (one matmul per layer, inner dimension (m-1) r) added into new base tensors.
- ``fedex (in place)``: the same, folded into the given base tensors (no copy of the base).
- ``fedex (naive)``: for reference, the residual from each client's B_i A_i materialised one by one,
  as the reference code does.

- ``fedex (factors only)``: FedIT plus the residual's factors U, V, not folded: what the server
  pays when the clients fold the broadcast factors themselves.
- ``fold alone``: only ``W += s U V`` in place, the factors computed beforehand: the dense
  d_out x d_in x (m-1) r product that every exact fold of a dense base performs, whatever computes
  the factors. Its time over FedIT's is a floor for any in-place fold's ratio on this machine; the
  summary gives its multiply-adds and the rate it ran at.

Time: median of ``--reps`` repetitions, the methods interleaved within each repetition, with the
default allocator. Memory: measured in a second process, peak resident set size during the call
minus the resident size just before it (Linux ``/proc/self/status`` VmHWM after resetting it
through ``/proc/self/clear_refs``), median over the repetitions; that process pins glibc's mmap
threshold (``MALLOC_MMAP_THRESHOLD_=4096``) so every tensor is mapped on allocation and unmapped on
free and the resident size follows torch's allocations (it would distort timings: page faults).

On a GPU (``--device cuda``) the tensors live on the device, each call is timed between
``torch.cuda.synchronize()`` calls, and memory is the peak of torch's CUDA allocator during the call
minus what was allocated before it (exact, in the same process).

    OMP_NUM_THREADS=1 python benchmarks/lora_aggregation.py
    python benchmarks/lora_aggregation.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from fedmoe.algorithms.lora import fedex_aggregate, fedit_aggregate
from fedmoe.algorithms.lora.common import fold, residual_factors
from fedmoe.algorithms.lora.layout import LoRALayer
from procstatus import status  # benchmarks/procstatus.py (this script's folder)

HIDDEN, KV = 896, 128
PROJECTIONS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN)}


def build(clients: int, layers: int, rank: int, seed: int = 0):
    """Layer records, the global state (base weights, adapters, a 2-way head) and client uploads."""
    gen = torch.Generator().manual_seed(seed)
    records, state = [], {}
    for i in range(layers):
        for proj, (d_out, d_in) in PROJECTIONS.items():
            name = f"model.layers.{i}.self_attn.{proj}"
            rec = LoRALayer(name, f"{name}.base_layer.weight", f"{name}.lora_A.default.weight",
                            f"{name}.lora_B.default.weight", 32.0 / rank)
            records.append(rec)
            state[rec.base_key] = torch.randn(d_out, d_in, generator=gen) * 0.02
            state[rec.a_key] = torch.randn(rank, d_in, generator=gen) * 0.02
            state[rec.b_key] = torch.zeros(d_out, rank)
    state["score.weight"] = torch.randn(2, HIDDEN, generator=gen) * 0.02
    uploads = []
    for _ in range(clients):
        uploads.append({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items() if "base_layer" not in k})
    samples = torch.randint(50, 500, (clients,), generator=gen).tolist()
    return records, state, uploads, samples


def naive_fedex(state, uploads, samples, records):
    """The residual from each client's B_i A_i, one dense d_out x d_in product per client."""
    new, _ = fedit_aggregate(state, uploads, samples, records)
    p = [n / sum(samples) for n in samples]
    for rec in records:
        acc = torch.zeros_like(state[rec.base_key])
        for w, up in zip(p, uploads):
            acc.add_(up[rec.b_key] @ up[rec.a_key], alpha=w)
        acc.sub_(new[rec.b_key] @ new[rec.a_key])
        new[rec.base_key] = state[rec.base_key] + rec.scaling * acc
    return new


def factors_only(state, uploads, samples, records):
    """FedIT plus each layer's residual factors (not folded)."""
    new, _ = fedit_aggregate(state, uploads, samples, records)
    p = [n / sum(samples) for n in samples]
    factors = {
        rec.name: residual_factors([u[rec.b_key] for u in uploads], [u[rec.a_key] for u in uploads], p, new[rec.a_key])
        for rec in records
    }
    return new, factors


def precomputed_factors(state, uploads, samples, records):
    """Each layer's residual factors (U, V), as ``fedex_aggregate`` computes them."""
    return factors_only(state, uploads, samples, records)[1]


def fold_alone(state, factors, records):
    """Only the folds, in place: base += s U V per layer."""
    for rec in records:
        u, v = factors[rec.name]
        fold(state[rec.base_key], u, v, rec.scaling, rec.fan_in_fan_out, inplace=True)
    return state


def on_device(built, device: torch.device):
    records, state, uploads, samples = built
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return records, move(state), [move(u) for u in uploads], samples


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes above those held before the call: resident set on the CPU, torch's
    allocator on CUDA)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return seconds, peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = status("VmHWM") - before
    del out
    return seconds, peak


def run(args: argparse.Namespace, memory: bool) -> dict[str, list[float]]:
    """Per method, the ``--reps`` timings (s) or peak resident deltas (bytes)."""
    records, state, uploads, samples = on_device(build(args.clients, args.layers, args.rank), args.device)
    bases = {r.base_key: state[r.base_key] for r in records}
    scratch = {"state": None}

    def fresh():
        scratch["state"] = {**state, **{k: v.clone() for k, v in bases.items()}}

    factors = precomputed_factors(state, uploads, samples, records)
    methods: dict[str, Callable[[], object]] = {
        "fedit": lambda: fedit_aggregate(state, uploads, samples, records),
        "fedex": lambda: fedex_aggregate(state, uploads, samples, records),
        "fedex (in place)": lambda: fedex_aggregate(scratch["state"], uploads, samples, records, inplace=True),
        "fedex (factors only)": lambda: factors_only(state, uploads, samples, records),
        "fedex (naive)": lambda: naive_fedex(state, uploads, samples, records),
        "fold alone (in place, factors given)": lambda: fold_alone(scratch["state"], factors, records),
    }
    out: dict[str, list[float]] = {m: [] for m in methods}
    fresh()
    for fn in methods.values():  # warm-up
        fn()
        fresh()
    for _ in range(args.reps):
        for name, fn in methods.items():
            seconds, peak = measure(fn, args.device)
            out[name].append(peak if memory else seconds)
            fresh()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.device = torch.device(args.device)
    if args.memory_only:
        print(json.dumps(run(args, memory=True)))
        return
    if args.device.type == "cuda":
        peaks = run(args, memory=True)
    else:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4096"}
        child = subprocess.run([sys.executable, *sys.argv, "--memory-only"], env=env, capture_output=True, text=True,
                               check=True)
        peaks = json.loads(child.stdout.strip().splitlines()[-1])
    times = run(args, memory=False)

    records, state, uploads, samples = on_device(build(args.clients, args.layers, args.rank), args.device)
    fast, _ = fedex_aggregate(state, uploads, samples, records)
    slow = naive_fedex(state, uploads, samples, records)
    err = max(float((fast[r.base_key] - slow[r.base_key]).abs().max()) for r in records)
    adapters = sum(v.numel() * v.element_size() for v in uploads[0].values())
    base = sum(state[r.base_key].numel() * 4 for r in records)
    print(f"{args.clients} clients, {args.layers} layers x (q, k, v, o), rank {args.rank}, float32; one client's "
          f"upload {adapters / 2**20:.1f} MiB, adapted base weights {base / 2**20:.1f} MiB; torch {torch.__version__}, "
          f"{where(args.device)}; median of {args.reps}")
    print(f"max |factored - naive| over the folded base weights: {err:.2e}")
    factors = precomputed_factors(state, uploads, samples, records)
    macs = sum(factors[r.name][0].shape[0] * factors[r.name][0].shape[1] * factors[r.name][1].shape[1] for r in records)
    fold_s = statistics.median(times["fold alone (in place, factors given)"])
    print(f"the fold's dense products: {macs / 1e9:.2f} G multiply-adds, run at {2 * macs / fold_s / 1e9:.1f} GFLOP/s\n")
    ref_t, ref_m = statistics.median(times["fedit"]), statistics.median(peaks["fedit"])
    memory = "peak CUDA allocation delta" if args.device.type == "cuda" else "peak RSS delta"
    print(f"| method | time (ms) | time / FedIT | {memory} (MiB) | memory / FedIT |")
    print("|---|---:|---:|---:|---:|")
    for name in times:
        t, m = statistics.median(times[name]), statistics.median(peaks[name])
        print(f"| {name} | {t * 1e3:.1f} | {t / ref_t:.2f} | {m / 2**20:.1f} | {m / max(ref_m, 1):.2f} |")


def where(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    return f"CPU, {torch.get_num_threads()} thread(s)"


if __name__ == "__main__":
    main()
