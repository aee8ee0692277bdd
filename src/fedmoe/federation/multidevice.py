"""One client's local training on several devices, through a Lightning strategy.

Under ``trainer.strategy`` ``ddp`` (or ``fsdp``, ``deepspeed``) with ``trainer.devices`` n, a local fit
starts n processes, as ``torchrun`` would: each sets ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``, builds ``Fabric(strategy=..., devices=n)``, which joins the process group (gloo on
the CPU, NCCL on GPUs) and wraps the module, and runs the same training loop as one device
(:func:`fedmoe.federation.runner.train_module`). The sampling, aggregation, evaluation and
server-side training of the round stay in the calling process; it receives rank 0's weights,
optimizer state and loss.

Every process reads the same batches from the client's loader, in the client's (seed, round,
client id) order, and keeps its own contiguous share of each batch (``B / n`` rows; the first
``B mod n`` processes one more). Its loss is weighted by ``n * rows / B``, so the gradients that the
strategy averages over processes are exactly those of the mean loss over the whole batch: the
weights equal one-device training with the same batches up to float rounding (the batch's gradient
is summed in another order), for losses that are means over a batch's samples. A process whose
share of a small last batch is empty runs one row with weight 0. Augmentation draws the same random
numbers in every process (each transforms the whole batch); dropout and other randomness of the
model draw from a stream of each process's own. BatchNorm statistics are each process's own.

Processes are forked on the CPU (they share the caller's memory, nothing is pickled) and spawned for
GPUs (CUDA cannot be forked once initialised; the module and loader are then saved to a
temporary file that each process maps). Each CPU process uses one torch thread.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from torch import nn

from fedmoe.errors import ConfigError
from fedmoe.federation.runner import FitOutput, Regularizer, RunnerSettings, cpu_cores, train_module


@dataclass
class _Job:
    """What every process of a multi-device fit needs."""

    module: nn.Module
    loader: Iterable
    settings: RunnerSettings
    epochs: int
    regularizer: Regularizer | None
    optimizer_state: dict | None
    return_optimizer_state: bool
    data_rng: torch.Tensor
    """The caller's CPU RNG state: every process reads the loader with it, as one device would."""
    model_seed: int
    """Seeds each process's own stream for the model's randomness (with its rank)."""


def start_method(settings: RunnerSettings) -> str:
    """``fork`` on the CPU where the platform has it, else ``spawn``."""
    return "fork" if settings.accelerator == "cpu" and "fork" in mp.get_all_start_methods() else "spawn"


def fit_on_devices(
    module: nn.Module,
    loader: Iterable,
    settings: RunnerSettings,
    epochs: int,
    regularizer: Regularizer | None = None,
    optimizer_state: dict | None = None,
    return_optimizer_state: bool = True,
) -> FitOutput:
    """Train ``module`` on ``settings.world_size`` devices with ``settings.strategy``, then load the
    trained weights into ``module`` (its state dict, strictly).

    Raises RuntimeError naming the process and its error if one fails (the others are stopped).
    Optimizer state is kept between fits under ``ddp`` only (FSDP shards it, DeepSpeed has its own).
    """
    if not settings.strategy.startswith("ddp") and (return_optimizer_state or optimizer_state is not None):
        raise RuntimeError(f"trainer.strategy={settings.strategy} does not carry optimizer state from one local fit "
                           "to the next: set federation.persistent_optimizer false, or use trainer.strategy ddp")
    data_rng = torch.get_rng_state()
    job = _Job(module, loader, settings, epochs, regularizer, optimizer_state, return_optimizer_state,
               data_rng=data_rng, model_seed=int(torch.randint(0, 2**62, ())))
    world, method = settings.world_size, start_method(settings)
    folder = Path(tempfile.mkdtemp(prefix="fedmoe-fit-"))
    try:
        payload: _Job | str = job
        if method == "spawn":
            payload = str(folder / "job.pt")
            try:
                torch.save(job, payload)
            except Exception as e:  # a lambda optimizer factory, an open file in the loader, ...
                raise ConfigError(
                    f"trainer.strategy={settings.strategy} on {settings.accelerator} starts new processes, which "
                    f"need the client module and its loader pickled, and that failed: {type(e).__name__}: {e}; "
                    "define the optimizer and transforms as importable classes or functions") from None
        port = find_free_network_port()
        context = mp.get_context(method)
        processes = [context.Process(target=_run_rank, args=(rank, world, port, payload, str(folder)),
                                     name=f"fedmoe-fit-rank{rank}") for rank in range(world)]
        try:
            for p in processes:
                p.start()
            _wait(processes, folder)
        except BaseException:  # interrupted: no process outlives the fit
            for p in processes:
                if p.pid is not None and p.exitcode is None:
                    p.kill()
                    p.join()
            raise
        result = torch.load(folder / "result.pt", weights_only=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    module.load_state_dict(result["module"])
    if hasattr(module, "planned_steps"):
        module.planned_steps = result["planned_steps"]
    return FitOutput(loss=result["loss"], steps=result["steps"], optimizer_state=result["optimizer_state"])


def _wait(processes: list, folder: Path) -> None:
    """Wait for every process; when one fails, stop the others and raise its error."""
    while True:
        codes = [p.exitcode for p in processes]
        if any(code not in (None, 0) for code in codes) or all(code == 0 for code in codes):
            break
        processes[codes.index(None)].join(0.05)
    if all(code == 0 for code in codes):
        return
    stopped = [p for p in processes if p.exitcode is None]
    for p in stopped:
        p.kill()
    for p in processes:
        p.join()
    errors = {}
    for rank, p in enumerate(processes):
        if p.exitcode != 0 and p not in stopped:
            text = folder / f"error-{rank}.txt"
            errors[rank] = text.read_text().strip() if text.exists() else f"exit code {p.exitcode}"
    # a process whose peer died fails on the lost connection: name the one that failed first
    own = [r for r, e in errors.items() if not any(w in e for w in ("Connection", "connection", "Broken pipe"))]
    rank = (own or list(errors))[0]
    raise RuntimeError(f"local training on {len(processes)} devices: rank {rank} failed: {errors[rank]}")


def _run_rank(rank: int, world: int, port: int, payload: "_Job | str", folder: str) -> None:
    """One process of a multi-device fit; exits without the interpreter's teardown."""
    code = 0
    try:
        _train_rank(rank, world, port, payload, Path(folder))
    except BaseException as e:
        code = 1
        (Path(folder) / f"error-{rank}.txt").write_text(f"{type(e).__name__}: {e}\n" + "".join(
            traceback.format_exception(e)[-6:]))
    finally:
        logging.shutdown()
    os._exit(code)


def _train_rank(rank: int, world: int, port: int, payload: "_Job | str", folder: Path) -> None:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    job: _Job = payload if isinstance(payload, _Job) else torch.load(payload, mmap=True, weights_only=False)
    s = job.settings
    torch.set_num_threads(1 if s.accelerator == "cpu" else max(1, cpu_cores() // world))
    for name in ("lightning.fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    s.apply_torch_flags()
    fabric = Fabric(accelerator=s.accelerator, devices=s.devices, strategy=s.strategy, precision=s.precision)
    fabric.launch()
    torch.manual_seed(int(np.random.SeedSequence([job.model_seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 2))
    batches = SameBatches(job.loader, job.data_rng)
    trained = train_module(fabric, job.module, batches, s, job.epochs, job.regularizer, job.optimizer_state,
                           split=BatchShare(rank, world))
    totals = fabric.all_reduce(torch.tensor([trained.total], dtype=torch.float64, device=fabric.device),
                               reduce_op="sum").cpu()
    weights, optimizer_state = _full_states(fabric, trained, job.return_optimizer_state)
    if rank == 0:
        count = trained.count
        result = {
            "module": weights,
            "optimizer_state": optimizer_state,
            "loss": float(totals[0]) / world / count if count else float("nan"),
            "steps": trained.steps,
            "planned_steps": getattr(job.module, "planned_steps", None),
        }
        torch.save(result, folder / "result.pt.tmp")
        os.replace(folder / "result.pt.tmp", folder / "result.pt")
    fabric.barrier()
    # leave now: tearing down DDP's reducer joins gloo's threads, which can wait forever on a peer
    # that has already exited; the result is written and every rank has passed the barrier
    os._exit(0)


def _full_states(fabric: Fabric, trained, with_optimizer: bool) -> tuple[dict, dict | None]:
    """The whole module's state dict (gathered where FSDP shards it: every process takes part) and,
    under DDP, the optimizer's state, on the CPU."""
    if type(fabric.strategy).__name__.startswith("FSDP"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(trained.model._forward_module, options=options), None
    weights = {k: v.detach().to("cpu", copy=True) for k, v in trained.model._original_module.state_dict().items()}
    return weights, _to_cpu(copy.deepcopy(trained.optimizer.state_dict())) if with_optimizer else None


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class SameBatches:
    """The loader's batches, read with torch's CPU RNG set to ``data_rng`` (and the process's own
    RNG state restored after each read), so that every process gets the same batches, in the same
    order, with the same augmentation, as one device would, whatever the model draws meanwhile."""

    def __init__(self, loader: Iterable, data_rng: torch.Tensor) -> None:
        self.loader = loader
        self.state = data_rng.clone()

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def _read(self, fn):
        own = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            return fn()
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(own)

    def __iter__(self) -> Iterator[Any]:
        iterator = self._read(lambda: iter(self.loader))
        while True:
            try:
                yield self._read(lambda: next(iterator))
            except StopIteration:
                return


class BatchShare:
    """Process ``rank``'s contiguous share of a batch and the weight of its loss.

    Tensors whose first dimension is the batch size are cut (rows ``start:stop``); other values are
    kept. The weight ``world * rows / B`` makes the mean over processes of the weighted per-share
    mean losses the mean over the whole batch. A share with no rows takes the first row, weight 0.
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def bounds(self, size: int) -> tuple[int, int]:
        base, extra = divmod(size, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def __call__(self, batch: Any) -> tuple[Any, float]:
        size = _batch_size(batch)
        if size is None:
            raise ValueError("a multi-device fit needs batches holding tensors whose first dimension is the batch size")
        start, stop = self.bounds(size)
        weight = self.world * (stop - start) / size
        if stop == start:
            start, stop = 0, 1
        return _cut(batch, size, start, stop), weight


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        size = _batch_size(value)
        if size is not None:
            return size
    return None


def _cut(batch: Any, size: int, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() and batch.shape[0] == size else batch
    if isinstance(batch, dict):
        return type(batch)({k: _cut(v, size, start, stop) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(_cut(v, size, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cut(v, size, start, stop) for v in batch)
    return batch
