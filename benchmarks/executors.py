"""Client-epochs per second and peak memory of the sequential, parallel and vectorized executors, side by side.

The executors train the same FEMNIST clients in the same rounds from the same start: the LEAF CNN
(``femnist_cnn``), Adam (lr 3e-4, fresh per client), batch size 64 and the training augmentation of
``experiments/femnist/fedavg.yaml``, one local epoch; ``--clients`` clients of
``--writers-per-client`` writers each (default: 5, or as many as the data holds for that many
clients). A warm-up round of each comes first, then ``--rounds`` measured rounds, interleaved
sequential, parallel, vectorized, sequential, ...; each side's time is ``Executor.run`` of the round's
tasks, from loading the clients' data to their weights back on the CPU (the loop's aggregation,
evaluation, logging and checkpoint are excluded). Each side's weights are compared with the
sequential side's from the same round (max |difference|), so a run also checks that the parallel
executor matches bit for bit (with ``--threads 1``: its CPU workers use one thread each) and the
vectorized one to float tolerance.

The parallel executor runs ``--parallel-devices`` workers (default ``cpu:2``; ``none`` leaves it out);
their start-up (spawn, imports, building the model and data) happens before the warm-up round.

CPU seconds: the user + system time of this process (for the parallel side, plus its workers) during
a side's round, a figure that other jobs on the machine disturb less than the wall-clock time (they
take cores away; they add little work). ``--fused-optimizer`` gives every side Adam with
``fused=True`` (the vectorized executor's CPU update always runs torch's fused kernel), to separate
the optimizer kernel's share of the difference from the rest.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during a side's rounds; on the CPU the
peak resident set size above the size before the side's round (sampled every 10 ms), for the
parallel side the sum over this process and its workers (pages of the shared buffers that several
processes touch count once per process). The vectorized executor also keeps its stacked buffers
(weights and optimizer state of a chunk's clients) between rounds; their size is printed.

    OMP_NUM_THREADS=1 python benchmarks/executors.py --data-dir ../shared/data/femnist --clients 20 --threads 1
    python benchmarks/executors.py --data-dir data/femnist --clients 100 --device cuda --parallel-devices none
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("fedmoe") is None:
    sys.path.insert(0, str(REPO / "src"))

import torch

from fedmoe.algorithms.base import ClientPlan
from fedmoe.data.femnist import FEMNISTDataModule, find_leaf_root, read_leaf
from fedmoe.executors import ClientTask, build_executor
from fedmoe.executors.parallel import Parallel
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier

NUM_CLASSES = 62
LR = 3e-4
DATA_DIRS = ("data/femnist", "../shared/data/femnist")


def adam(params):
    return torch.optim.Adam(params, lr=LR)


def adam_fused(params):
    return torch.optim.Adam(params, lr=LR, fused=True)


def cpu_seconds(pids: list[int] = ()) -> float:
    """User + system CPU seconds of this process so far, plus those of processes ``pids`` (0 for one
    whose /proc/PID/stat cannot be read)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    total = r.ru_utime + r.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            pass
    return total


class PeakRSS:
    """Peak resident set size of this process (plus processes ``pids``) while inside the ``with``
    block, above the size at entry."""

    def __init__(self, interval: float = 0.01, pids: list[int] = ()) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.pids = ["self", *map(str, pids)]

    def rss(self) -> int:
        """Resident bytes now, summed over the processes (0 for one whose /proc/PID/statm cannot be read)."""
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * self.page
            except (OSError, ValueError, IndexError):
                pass
        return total

    def _watch(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.rss())
            self.done.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    line = (f"machine: {platform.node()} | {cpu}, {os.cpu_count()} CPUs | python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        line += f" | device: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        line += " | device: cpu"
    return line


def data_dir(given: str | None) -> str:
    if given:
        return given
    for d in DATA_DIRS:
        if (REPO / d).is_dir() or Path(d).is_dir():
            return str(REPO / d) if (REPO / d).is_dir() else d
    sys.exit(f"error: no FEMNIST data in {', '.join(DATA_DIRS)}; give --data-dir (a folder with LEAF train/ and test/)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="LEAF FEMNIST folder (train/, test/); default: " + ", ".join(DATA_DIRS))
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--writers-per-client", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per side (after a warm-up round)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--chunk-size", type=int, default=None, help="vectorized executor: clients per batched model")
    p.add_argument("--compute", choices=("vmap", "loop"), default=None,
                   help="vectorized executor: vmap (default on a GPU) or loop (default on the CPU)")
    p.add_argument("--parallel-devices", default="cpu:2",
                   help="parallel executor: cpu:N worker processes, GPU ids such as 0,1, or none")
    p.add_argument("--fused-optimizer", action="store_true",
                   help="Adam with fused=True on every side (default: torch.optim.Adam's default kernel)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA GPU here")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    print(machine_line(device), flush=True)

    folder = data_dir(args.data_dir)
    t0 = time.perf_counter()
    writers = len(read_leaf(find_leaf_root(folder) / "train"))
    wpc = args.writers_per_client or min(5, max(1, (writers - 2) // args.clients))
    dm = FEMNISTDataModule(folder, num_clients=args.clients, writers_per_client=wpc, server_writers=1,
                           probe_writers=1, batch_size=args.batch_size)
    dm.setup()
    sizes = [len(d) for d in dm.splits.client_train]
    print(f"data: {folder}: {writers} writers; {args.clients} clients x {wpc} writers, {sum(sizes)} training samples "
          f"(per client {min(sizes)}..{max(sizes)}), batch {args.batch_size}, {args.epochs} local epoch(s), "
          f"Adam lr {LR}{' fused' if args.fused_optimizer else ''}; read in {time.perf_counter() - t0:.1f}s", flush=True)

    settings = RunnerSettings(accelerator=args.device, max_epochs=args.epochs)
    names = ["sequential", "parallel", "vectorized"]
    if args.parallel_devices.lower() == "none":
        names.remove("parallel")
    sides = {}
    for name in names:
        torch.manual_seed(0)
        module = Classifier("femnist_cnn", NUM_CLASSES, optimizer=adam_fused if args.fused_optimizer else adam)
        start = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
        if name == "parallel":
            devices = args.parallel_devices
            executor = Parallel(devices if devices.lower().startswith("cpu") else [int(d) for d in devices.split(",")])
        else:
            executor = build_executor(name)
        if name == "vectorized":
            executor.chunk_size, executor.compute = args.chunk_size, args.compute
        executor.bind(module, dm, settings)
        if name == "parallel":
            t = time.perf_counter()
            executor.start()
            rest = PeakRSS(pids=executor.pids).rss() - PeakRSS().rss()
            print(f"parallel: {len(executor.pids)} workers on {args.parallel_devices} started in "
                  f"{time.perf_counter() - t:.1f}s, resident {rest / 2**20:,.0f} MiB together", flush=True)
        sides[name] = {"executor": executor, "start": start, "times": [], "cpu": [], "peak": 0, "parts": {}}
    params = sum(v.numel() for v in sides["sequential"]["start"].values())
    vec = sides["vectorized"]["executor"]
    compute = vec.compute or ("loop" if device.type == "cpu" else "vmap")
    print(f"model: femnist_cnn, {params / 1e6:.2f}M parameters per client; vectorized: compute {compute}, "
          f"chunk size {vec.chunk_size or (1 if compute == 'loop' else 'all')}", flush=True)
    _time_parts(sides["vectorized"])

    def run(name: str, r: int):
        side = sides[name]
        tasks = [ClientTask(c, ClientPlan(weights=side["start"]), round=r, seed=0) for c in range(args.clients)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        pids = side["executor"].pids if name == "parallel" else []
        with PeakRSS(pids=pids) as rss:
            cpu = cpu_seconds(pids)
            t = time.perf_counter()
            out = side["executor"].run(tasks)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t
            cpu = cpu_seconds(pids) - cpu
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.extra
        failed = [o for o in out if not hasattr(o, "result")]
        if failed:
            raise RuntimeError(f"{len(failed)} clients failed, e.g. {failed[0].error}")
        return out, seconds, cpu, peak

    diffs: dict[str, list] = {n: [] for n in names if n != "sequential"}
    for r in range(args.rounds + 1):
        outs = {}
        for name in [n for n in names if n in sides]:
            try:
                outs[name], seconds, cpu, peak = run(name, r)
            except Exception as e:  # report the other side still
                print(f"  {name} failed: {type(e).__name__}: {e}; measuring the other sides only", flush=True)
                sides.pop(name)["executor"].close()
                continue
            label = "warm-up" if r == 0 else f"round {r}"
            print(f"  {label:8s} {name:10s} {seconds:8.3f}s  ({args.clients * args.epochs / seconds:8.1f} client-epochs/s, "
                  f"{cpu:7.2f} CPU s, peak {peak / 2**20:,.0f} MiB, load {os.getloadavg()[0]:.1f})",
                  flush=True)
            if r > 0:
                sides[name]["times"].append(seconds)
                sides[name]["cpu"].append(cpu)
                sides[name]["peak"] = max(sides[name]["peak"], peak)
            if r == 0 and name == "vectorized":  # time parts of the measured rounds only
                side_parts = sides[name]["parts"]
                for key in side_parts:
                    side_parts[key] = 0.0
        for other in diffs:
            for a, b in zip(outs.get("sequential", []), outs.get(other, [])):
                for k in a.result.weights:
                    d = (a.result.weights[k] - b.result.weights[k]).abs()
                    diffs[other].append((d.max().item(), d.sum().item(), d.numel()))
        del outs

    kept = sum(t.numel() * t.element_size() for t in vec._pool.tensors.values())
    for side in sides.values():
        side["executor"].close()
    print()
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if "vectorized" in sides:
        print(f"vectorized: stacked weights and optimizer state kept between rounds: {kept / 2**20:,.0f} MiB")
    rates = {}
    for name, side in sides.items():
        med = statistics.median(side["times"])
        rates[name] = args.clients * args.epochs / med
        kind = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS above start"
        print(f"{name:10s}: {rates[name]:9.1f} client-epochs/s (median round {med:.3f}s of {len(side['times'])}), "
              f"median {statistics.median(side['cpu']):.2f} CPU s, {kind} {side['peak'] / 2**20:,.0f} MiB")
    if "sequential" not in sides or len(sides) < 2:
        print("only one side ran, or not the sequential one: no ratio")
        return 1
    parts = sides["vectorized"]["parts"] if "vectorized" in sides else {}
    if parts:
        total = sum(sides["vectorized"]["times"])
        shown = ", ".join(f"{k} {v / total:.0%}" for k, v in parts.items())
        print(f"vectorized time: {shown}, rest (stacking, steps) {(total - sum(parts.values())) / total:.0%}")
    for other, found in diffs.items():
        if other in sides and found:
            note = (" (Adam's update near eps magnifies summation-order differences of the gradients up to ~lr)"
                    if other == "vectorized" else "")
            print(f"|w_{other} - w_sequential| over clients and rounds: max {max(d[0] for d in found):.2e}, "
                  f"mean {sum(d[1] for d in found) / sum(d[2] for d in found):.2e}{note}")
    for other in diffs:
        if other in sides:
            cpu_ratio = statistics.median(sides["sequential"]["cpu"]) / statistics.median(sides[other]["cpu"])
            print(f"ratio {other} / sequential: {rates[other] / rates['sequential']:.2f}x "
                  f"({args.clients} clients, {args.device}, sequential with {torch.get_num_threads()} thread(s)); "
                  f"CPU seconds sequential / {other}: {cpu_ratio:.2f}x")
    return 0


def _time_parts(side: dict) -> None:
    """Accumulate the vectorized executor's time in reading client batches and returning results."""
    executor, parts = side["executor"], side["parts"]
    for attr, label in (("_batches", "reading batches"), ("_outcomes", "results to CPU")):
        inner = getattr(executor, attr)
        parts[label] = 0.0

        def timed(*a, _inner=inner, _label=label, **kw):
            t = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                parts[_label] += time.perf_counter() - t

        setattr(executor, attr, timed)


if __name__ == "__main__":
    sys.exit(main())
