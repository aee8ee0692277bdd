"""The same FedAvg job end to end with this engine (sequential executor), a bare PyTorch loop,
pfl-research 0.6.0 and Flower 1.41's simulation (default settings, and one thread per actor), side
by side, with the digests of the final weights and each side's time as a ratio to ours.

The job (the issue's): FEMNIST sample, ``--clients`` clients x ``--writers-per-client`` writers
(plus one server and one probe writer), the LEAF CNN, ``--rounds`` rounds of 1 local epoch, batch
32, SGD lr 0.05, all clients every round, no evaluation, checkpoint or logs. Every side runs in a
fresh Python process (imports excluded from its time; the time runs from building the job from the
config to the final weights, so Flower's includes starting Ray and its actors, which build the
job themselves), the sides interleaved ``--repeats`` times; medians are reported.

Sides:
  bare            the floor: a plain PyTorch loop (no engine) doing the same local training (SGD
                  steps on ``F.cross_entropy`` over the data module's client loaders, whose batch
                  order and augmentation come from (seed, round, client id)) and the same
                  sample-weighted mean, accumulated in the engine's order: bit-identical to ours
  ours            FederatedLoop with the sequential executor, ``--threads`` torch threads
  ours-parallel   FederatedLoop with the parallel executor on ``cpu:2`` (two persistent worker
                  processes, one torch thread each: what flower-1thread does with two Ray actors);
                  bit-identical to ``ours`` at ``--threads 1``
  pfl             pfl-research 0.6.0 as its docstrings describe it: ``FederatedAveraging`` on a
                  ``SimulatedBackend`` with ``WeightByDatapoints``, a ``PyTorchModel`` (local SGD
                  0.05, central SGD lr 1.0 on the averaged model difference), a ``FederatedDataset``
                  whose ``make_dataset_fn`` gives each client, in each round, the very batches our
                  loader yields (pfl slices a user's tensors in order, without shuffling); same
                  initial weights, ``--threads`` torch threads. Its local training is the same
                  arithmetic; its aggregation is not (it averages differences n_c * (w_c - w) / n,
                  then adds them), so its weights differ from ours in the last bits: the summary
                  gives the largest difference. Left alone, pfl evaluates every user before and
                  after local training in its first central iteration (``iteration %
                  evaluation_frequency == 0`` holds at 0, whatever the frequency); the job evaluates
                  nothing, so its central contexts are passed on with ``do_evaluation`` off
                  (``--pfl-first-eval`` keeps pfl's default)
  flower-default  flwr.simulation.run_simulation with Flower's default backend (2 CPUs per actor)
                  and torch's default threads in the actors
  flower-1thread  1 CPU per actor (one actor per core) and one torch thread each

Equal digests mean bit-identical final weights (the sides agree when their torch thread counts
do: ``--threads 1`` against flower-1thread). Each side's final weights are kept; the summary gives
every side's largest absolute difference from ours and, where the digests differ, the test loss and
accuracy of both.

    python benchmarks/vs_peers.py --data-dir ../shared/data/femnist
    python benchmarks/vs_peers.py --data-dir ../shared/data/femnist --clients 4 --rounds 2 --repeats 1
    python benchmarks/vs_peers.py --sides bare ours pfl --clients 4 --writers-per-client 2 --rounds 2 --repeats 1
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

SIDES = ("bare", "ours", "ours-parallel", "pfl", "flower-default", "flower-1thread")


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


def bare_fedavg(job) -> dict:
    """The job as a plain PyTorch loop: the engine's client sampling rule, then for each client the
    global weights loaded, fresh SGD, one pass over its loader, and the sample-weighted mean
    accumulated in float32 in client order (as :func:`fedmoe.algorithms.fusion.mix` does)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    net, data, fed, seed = job.module.net, job.datamodule, job.federation, job.seed
    lr = job.module.configure_optimizers().param_groups[0]["lr"]
    n = len(data.splits.client_train)
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for r in range(1, fed.rounds + 1):
        ids = sorted(int(c) for c in np.random.default_rng([seed, r]).choice(n, size=fed.clients_per_round,
                                                                             replace=False))
        states, sizes = [], []
        for cid in ids:
            net.load_state_dict(weights)
            net.train()
            opt = torch.optim.SGD(net.parameters(), lr=lr)
            for x, y in data.client_train_loader(cid, r, seed):
                F.cross_entropy(net(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
            sizes.append(len(data.splits.client_train[cid]))
        total = float(sum(sizes))
        new = {}
        for k, v in weights.items():
            acc = torch.zeros_like(v, dtype=torch.float32)
            for state, size in zip(states, sizes):
                acc.add_(state[k], alpha=size / total)
            new[k] = acc.to(v.dtype)
        weights = new
    return weights


def pfl_fedavg(job, modules, first_eval: bool = False) -> dict:
    """The job in pfl-research: each client's data is the batches our loader yields it in that round
    (pfl iterates a user's tensors in order), so that the local training matches ours. Without
    ``first_eval`` no central iteration evaluates its users (pfl's first one does by default)."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    algorithm_mod, simulate, weighting, federated_dataset, dataset, sampling, hyperparam, pytorch, metrics = modules
    data, fed, seed = job.datamodule, job.federation, job.seed
    lr = job.module.configure_optimizers().param_groups[0]["lr"]

    class Net(torch.nn.Module):
        """The client network with the ``loss`` and ``metrics`` pfl's PyTorchModel calls."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def loss(self, x, y, eval=False):
            self.eval() if eval else self.train()
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y, eval=False):
            self.eval() if eval else self.train()
            logits = self(x)
            return {"loss": metrics.Weighted(F.cross_entropy(logits, y, reduction="sum").item(), len(y)),
                    "accuracy": metrics.Weighted((logits.argmax(1) == y).sum().item(), len(y))}

    class FedAvg(algorithm_mod.FederatedAveraging):
        """pfl's FedAvg; unless ``first_eval``, its central contexts ask no user evaluation."""

        def get_next_central_contexts(self, *args, **kwargs):
            contexts, model, out = super().get_next_central_contexts(*args, **kwargs)
            if contexts is not None and not first_eval:
                contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
            return contexts, model, out

    rounds_seen: dict[int, int] = {}

    def make_dataset(user_id: int):
        r = rounds_seen[user_id] = rounds_seen.get(user_id, 0) + 1
        xs, ys = zip(*data.client_train_loader(user_id, r, seed))
        return dataset.Dataset(raw_data=[torch.cat(xs), torch.cat(ys)], user_id=str(user_id))

    users = list(range(len(data.splits.client_train)))
    train = federated_dataset.FederatedDataset(make_dataset, sampling.get_user_sampler("minimize_reuse", users))
    backend = simulate.SimulatedBackend(training_data=train, val_data=train,
                                        postprocessors=[weighting.WeightByDatapoints()])
    net = Net(job.module.net)
    model = pytorch.PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                                 central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    FedAvg().run(
        algorithm_params=algorithm_mod.NNAlgorithmParams(central_num_iterations=fed.rounds,
                                                         evaluation_frequency=fed.rounds,
                                                         train_cohort_size=fed.clients_per_round,
                                                         val_cohort_size=0),
        backend=backend, model=model,
        model_train_params=hyperparam.NNTrainHyperParams(local_num_epochs=1, local_learning_rate=lr,
                                                         local_batch_size=data.batch_size),
        model_eval_params=hyperparam.NNEvalHyperParams(local_batch_size=data.batch_size),
        callbacks=[], send_metrics_to_platform=False)
    return {k: v.detach().clone() for k, v in net.net.state_dict().items()}


def run_side(side: str, config: str, threads: int, weights_out: str | None = None, pfl_first_eval: bool = False) -> dict:
    """One side in this process (called in a fresh process by :func:`main`)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import torch

    from fedmoe.federation.loop import FederatedLoop
    from fedmoe.federation.job import build_job
    from fedmoe.flower.simulation import backend_config, simulate
    from fedmoe.flower.strategy import weights_digest

    weights = None
    if side in ("bare", "ours", "ours-parallel", "pfl"):
        torch.set_num_threads(threads)
    if side == "pfl":
        import pfl.aggregate.simulate
        import pfl.aggregate.weighting
        import pfl.algorithm
        import pfl.data.dataset
        import pfl.data.federated_dataset
        import pfl.data.sampling
        import pfl.hyperparam
        import pfl.metrics
        import pfl.model.pytorch

        modules = (pfl.algorithm, pfl.aggregate.simulate, pfl.aggregate.weighting, pfl.data.federated_dataset,
                   pfl.data.dataset, pfl.data.sampling, pfl.hyperparam, pfl.model.pytorch, pfl.metrics)
        t0 = time.perf_counter()
        weights = pfl_fedavg(build_job(config), modules, pfl_first_eval)
        seconds = time.perf_counter() - t0
    elif side == "bare":
        t0 = time.perf_counter()
        weights = bare_fedavg(build_job(config))
        seconds = time.perf_counter() - t0
    elif side in ("ours", "ours-parallel"):
        t0 = time.perf_counter()
        job = build_job(config, ["--federation.executor", "parallel"] if side == "ours-parallel" else [])
        loop = FederatedLoop(job.federation, job.module, job.datamodule, settings=job.settings, run_dir=job.run_dir,
                             seed=job.seed)
        loop.fit()
        seconds = time.perf_counter() - t0
        weights = loop.state["global"]
    else:
        one = side == "flower-1thread"
        t0 = time.perf_counter()
        run = simulate(config, output_dir=Path(config).parent / side, threads_per_client=1 if one else None,
                       backend=backend_config(cpus_per_client=1 if one else None))
        seconds = time.perf_counter() - t0
        from safetensors.torch import load_file

        weights = load_file(str(Path(run.output_dir) / "server_weights.safetensors"))
    if weights is not None:
        digest = weights_digest(weights)
        if weights_out:
            torch.save({k: v.detach().cpu() for k, v in weights.items()}, weights_out)
    return {"side": side, "seconds": seconds, "digest": digest}


def test_metrics(config: Path, weights: dict) -> tuple[float, float]:
    """Test-set loss and accuracy of final weights (outside any side's time)."""
    import torch
    import torch.nn.functional as F

    from fedmoe.federation.job import build_job

    job = build_job(config)
    net = job.module.net
    net.load_state_dict(weights)
    net.eval()
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in job.datamodule.eval_loader(job.datamodule.splits.test):
            logits = net(x)
            total += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
    return total / count, correct / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data/femnist", help="a LEAF FEMNIST folder (train/, test/)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--writers-per-client", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the bare, ours and pfl sides")
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    p.add_argument("--pfl-first-eval", action="store_true",
                   help="let pfl evaluate every user before and after training in its first central iteration "
                        "(its default; the job itself evaluates nothing)")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--weights-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.config, args.threads, args.weights_out, args.pfl_first_eval)))
        return
    import torch

    with tempfile.TemporaryDirectory(prefix="vs-peers-") as tmp:
        config = job_config(args, Path(tmp))
        print(f"job: FedAvg, FEMNIST {args.clients} clients x {args.writers_per_client} writers, {args.rounds} rounds, "
              f"1 epoch, batch 32, SGD 0.05; machine: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
        times: dict[str, list[float]] = {s: [] for s in args.sides}
        digests: dict[str, set[str]] = {s: set() for s in args.sides}
        for r in range(args.repeats):
            for side in args.sides:
                cmd = [sys.executable, __file__, "--side", side, "--config", str(config), "--threads", str(args.threads),
                       "--weights-out", str(Path(tmp) / f"{side}.pt")] + (["--pfl-first-eval"] * args.pfl_first_eval)
                env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                if out.returncode != 0 or not lines:
                    print(f"{side}: failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
                    continue
                res = json.loads(lines[-1])
                times[side].append(res["seconds"])
                digests[side].add(res["digest"])
                print(f"repeat {r + 1}: {side:15s} {res['seconds']:7.1f} s  digest {res['digest'][:16]}  "
                      f"(load average {os.getloadavg()[0]:.2f})", flush=True)
        finals = {s: torch.load(Path(tmp) / f"{s}.pt") for s in args.sides if (Path(tmp) / f"{s}.pt").exists()}
        ref = finals.get("ours")
        ours = statistics.median(times["ours"]) if times.get("ours") else None
        print("\nside             median s   / ours   digest            max |w - ours|")
        for side in args.sides:
            if not times[side]:
                continue
            med = statistics.median(times[side])
            ratio = f"{med / ours:7.2f}x" if ours else "      -"
            diff = (max(float((finals[side][k].float() - ref[k].float()).abs().max()) for k in ref)
                    if ref is not None and side in finals else float("nan"))
            print(f"{side:15s} {med:9.1f} {ratio}   {', '.join(d[:16] for d in sorted(digests[side])):17s} {diff:.3g}")
        same = len(set().union(*digests.values())) == 1
        print(f"digests {'agree' if same else 'differ'} across sides")
        if not same and ref is not None:
            for side in ["ours"] + [s for s in finals if s != "ours" and digests[s] != digests["ours"]]:
                loss, acc = test_metrics(config, finals[side])
                print(f"{side:15s} test loss {loss:.4f}  accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
