"""Heterogeneous workers that really train their domain's LoRA expert (DESIGN.md §4).

A worker (:class:`WorkerSpec`) has an id, a specialty (the expert it trains), a speed factor (a
rate: compute time = steps / speed), a network latency (seconds added to every job), a failure
probability and a device. One job of a worker (:func:`run_federation`):

1. draw a failure from the worker's own seeded generator (``numpy`` ``default_rng([seed, position])``);
2. pull its expert's snapshot from the coordinator and load it (adapter and frozen correction) into
   the worker's :class:`~fedmoe.models.causal.ExpertModel`;
3. really train ``steps_per_update`` AdamW steps on its private batches (loss on response tokens
   only; the batches continue where the last job stopped, cycling);
4. after the clock's delay (:mod:`fedmoe.experts.clocks`), push an
   :class:`~fedmoe.experts.coordinator.Update` (expert, worker, the version it pulled, trained
   factors, its sample count). A failed job pushes nothing and is counted; on the simulated clock
   it does not train either (its time still passes; skipping the work changes nothing else, since
   every job reloads a snapshot and seeds its own randomness).

Models. Workers train in a :class:`ModelPool`: per worker, a model and the lock that serialises the
workers sharing it. :meth:`ModelPool.per_device` (the default) keeps one model per device: on one
CPU every worker shares the model and they take turns (the wall clock then overlaps only latencies
and sleeps); on a multi-GPU machine, one worker per GPU, each GPU holds its own copy and the
workers really train concurrently. :meth:`ModelPool.per_worker` gives each worker its own copy;
copies on the same device share the frozen base parameters (only LoRA and correction tensors are
copied), so CPU threads really train concurrently at the cost of the adapters alone.

The reference simulation's fleet (seeds/000) is :data:`DEFAULT_WORKERS`: 5 workers, 3 experts. Its
factors multiplied a sleep (0.5 was its fast worker); here speed is a rate, so each is 1 / factor.
"""

from __future__ import annotations

import copy
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedmoe.errors import ConfigError
from fedmoe.experts.clocks import Clock, Process
from fedmoe.experts.coordinator import ExpertCoordinator, Update
from fedmoe.models.causal import ExpertModel, LocalResult

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]
Status = Literal["applied", "pending", "refused", "failed", "flushed"]

WORKER_FIELDS = ("id", "specialty", "speed", "latency", "failure_rate", "device")
WORKER_FORMAT = "ID:EXPERT:SPEED (e.g. w1:python:0.8)"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


# ------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: its id, the expert it trains, speed (a rate, > 0), latency (seconds, >= 0),
    failure probability per job (in [0, 1]) and torch device (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""

    id: str
    specialty: str
    speed: float = 1.0
    latency: float = 0.0
    failure_rate: float = 0.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID.match(self.id):
            raise ConfigError(f"worker {self.id!r} field 'id' must be letters, digits, '_', '.' or '-'")
        if not isinstance(self.specialty, str) or not self.specialty:
            raise ConfigError(f"worker {self.id!r} field 'specialty' must name an expert, got {self.specialty!r}")
        checks = (
            ("speed", self.speed, lambda v: v > 0, "a finite number > 0"),
            ("latency", self.latency, lambda v: v >= 0, "a finite number >= 0 (seconds)"),
            ("failure_rate", self.failure_rate, lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
        )
        for key, value, ok, what in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise ConfigError(f"worker {self.id!r} field {key!r} must be {what}, got {value!r}")
            object.__setattr__(self, key, float(value))
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ConfigError(f"worker {self.id!r} field 'device' must be cpu, cuda, cuda:N or mps, got {self.device!r}")


#: The reference simulation's fleet (its time factors 0.5, 2.0, 1.0, 1.5, 1.0 as rates).
DEFAULT_WORKERS: tuple[WorkerSpec, ...] = (
    WorkerSpec("Worker-1-Fast", "python", 2.0),
    WorkerSpec("Worker-2-Slow", "python", 0.5),
    WorkerSpec("Worker-3-SQL", "sql", 1.0),
    WorkerSpec("Worker-4-Docs", "docs", 1 / 1.5),
    WorkerSpec("Worker-5-Python", "python", 1.0),
)
DEFAULT_EXPERTS: tuple[str, ...] = ("python", "sql", "docs")


def parse_worker(text: str) -> WorkerSpec:
    """A worker from the command line's ``ID:EXPERT:SPEED``; SPEED is a rate (2 = twice as fast)."""
    parts = [p.strip() for p in str(text).split(":")]
    if len(parts) != 3:
        raise ConfigError(f"--worker {text!r} has {len(parts)} field(s); use {WORKER_FORMAT}")
    wid, expert, speed = parts
    try:
        value = float(speed)
    except ValueError:
        raise ConfigError(
            f"--worker {text!r}: worker {wid!r} field 'speed' is {speed!r}, not a number; use {WORKER_FORMAT}"
        ) from None
    return WorkerSpec(wid, expert, value)


def workers_from_records(records: Any, where: str = "worker list") -> list[WorkerSpec]:
    """Workers from a JSON value: a list of objects with ``id`` and ``specialty`` and optionally
    ``speed``, ``latency``, ``failure_rate``, ``device``; nothing else."""
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{where}: expected a non-empty JSON list of {{{', '.join(WORKER_FIELDS)}}} objects")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ConfigError(f"{where}: entry {i} is a {type(rec).__name__}; expected an object with id and specialty")
        name = rec.get("id", f"#{i}")
        for key in ("id", "specialty"):
            if key not in rec:
                raise ConfigError(f"{where}: worker {name!r} has no field {key!r}")
        unknown = sorted(set(rec) - set(WORKER_FIELDS))
        if unknown:
            raise ConfigError(f"{where}: worker {name!r} has unknown field {unknown[0]!r}; fields: {', '.join(WORKER_FIELDS)}")
        for key in ("id", "specialty", "device"):
            if key in rec and not isinstance(rec[key], str):
                raise ConfigError(f"{where}: worker {name!r} field {key!r} must be a string, got {rec[key]!r}")
        out.append(WorkerSpec(**rec))
    return out


def load_workers_json(path: str | Path) -> list[WorkerSpec]:
    """Workers from a JSON file (``--worker-json``): :func:`workers_from_records`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"worker file {path} does not exist")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"worker file {path} is not JSON: {str(e).splitlines()[0]}") from None
    return workers_from_records(records, f"worker file {path}")


def resolve_workers(specs: Sequence[WorkerSpec], experts: Sequence[str]) -> list[WorkerSpec]:
    """The workers with their specialty checked against ``experts`` (the reference simulation's
    ``python_expert`` names ``python``) and their ids unique."""
    specs = list(specs)
    if not specs:
        raise ConfigError("no workers: give --worker ID:EXPERT:SPEED or --worker-json FILE")
    seen: set[str] = set()
    out = []
    for spec in specs:
        if spec.id in seen:
            raise ConfigError(f"worker {spec.id!r} field 'id' repeats; give every worker its own id")
        seen.add(spec.id)
        name = spec.specialty
        if name not in experts and name.removesuffix("_expert") in experts:
            name = name.removesuffix("_expert")
        if name not in experts:
            raise ConfigError(
                f"worker {spec.id!r} field 'specialty': unknown expert {spec.specialty!r}; experts: {', '.join(experts)}"
            )
        out.append(replace(spec, specialty=name) if name != spec.specialty else spec)
    return out


# ------------------------------------------------------------------------------------ models


def _device(name: str | torch.device) -> torch.device:
    dev = torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def model_device(model: ExpertModel) -> torch.device:
    return _device(next(model.parameters()).device)


def _check_device(spec: WorkerSpec) -> torch.device:
    dev = torch.device(spec.device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ConfigError(
                f"worker {spec.id!r} field 'device' is {spec.device!r}, but this machine has {count} CUDA device(s)"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"worker {spec.id!r} field 'device' is 'mps', which this machine does not have")
    return _device(dev)


def replicate(model: ExpertModel, device: torch.device | str | None = None) -> ExpertModel:
    """A copy of ``model`` on ``device`` (default: its own). On the same device the frozen base
    parameters are shared, not copied (only ``lora_`` tensors are); on another, all is copied."""
    device = model_device(model) if device is None else _device(device)
    if device == model_device(model):
        memo = {id(p): p for n, p in model.named_parameters() if "lora_" not in n}
        return copy.deepcopy(model, memo)
    return copy.deepcopy(model).to(device)


class ModelPool:
    """The model each worker trains in, and one lock per distinct model (workers sharing a model
    take turns)."""

    def __init__(self, assignment: Mapping[str, ExpertModel]) -> None:
        self._models = dict(assignment)
        self._locks = {id(m): threading.Lock() for m in self._models.values()}

    @classmethod
    def per_device(cls, model: ExpertModel, workers: Sequence[WorkerSpec]) -> "ModelPool":
        """One model per device: ``model`` on its own device, a full copy on each other device."""
        home = model_device(model)
        by_device = {home: model}
        assignment = {}
        for spec in workers:
            dev = _check_device(spec)
            if dev not in by_device:
                by_device[dev] = replicate(model, dev)
            assignment[spec.id] = by_device[dev]
        return cls(assignment)

    @classmethod
    def per_worker(cls, model: ExpertModel, workers: Sequence[WorkerSpec]) -> "ModelPool":
        """One model per worker (the first worker on ``model``'s device uses ``model``); copies on
        ``model``'s device share its frozen base."""
        home, used, assignment = model_device(model), False, {}
        for spec in workers:
            dev = _check_device(spec)
            if dev == home and not used:
                assignment[spec.id], used = model, True
            else:
                assignment[spec.id] = replicate(model, dev)
        return cls(assignment)

    def model(self, worker: str) -> ExpertModel:
        if worker not in self._models:
            raise ConfigError(f"worker {worker!r} has no model in the pool; build the pool from the same workers")
        return self._models[worker]

    def models(self) -> list[ExpertModel]:
        """The distinct models, in worker order."""
        return list({id(m): m for m in self._models.values()}.values())

    @contextmanager
    def lease(self, worker: str) -> Iterator[ExpertModel]:
        """The worker's model, held exclusively while inside the block."""
        model = self.model(worker)
        with self._locks[id(model)]:
            yield model


# ------------------------------------------------------------------------------------ workers


class _Stream:
    """A worker's batches on its device, continuing where the last job stopped. A pass that ends
    within a ``train_steps`` call raises StopIteration (so it cycles, and refuses data with no
    response token); a pass left over from an earlier job restarts silently."""

    def __init__(self, batches: Iterable[Batch], device: torch.device) -> None:
        self.batches, self.device = batches, device
        self._it: Iterator[Batch] | None = None
        self._served = 0

    def __iter__(self) -> "_Stream":
        self._served = 0
        return self

    def __next__(self) -> Batch:
        fresh = self._it is None
        if fresh:
            self._it = iter(self.batches)
        try:
            inputs, labels = next(self._it)
        except StopIteration:
            self._it = None
            if fresh or self._served:
                raise
            return next(self)
        self._served += 1
        if self.device.type != "cpu":
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
            labels = labels.to(self.device, non_blocking=True)
        return inputs, labels


def _num_samples(batches: Iterable[Batch]) -> int:
    dataset = getattr(batches, "dataset", None)
    try:
        return max(1, len(dataset if dataset is not None else batches))  # type: ignore[arg-type]
    except TypeError:
        return 1


class Worker:
    """A worker's state during a run: its spec, private batches, failure generator and job count.

    Args:
        spec: the worker.
        batches: its private ``(inputs, labels)`` batches (e.g. a DataLoader over
            :func:`~fedmoe.data.instructions.tokenize_instructions`); re-iterable.
        num_samples: its sample count (the sync rules' weight); default ``len(batches.dataset)``.
        seed, position: the failure generator is ``default_rng([seed, position])``.
        device: where its batches go (its model's device).
    """

    def __init__(
        self, spec: WorkerSpec, batches: Iterable[Batch], num_samples: int | None = None, seed: int = 0,
        position: int = 0, device: torch.device | str = "cpu",
    ) -> None:
        self.spec = spec
        self.stream = _Stream(batches, _device(device))
        self.num_samples = int(num_samples) if num_samples is not None else _num_samples(batches)
        self.seed, self.position = int(seed), int(position)
        self.rng = np.random.default_rng([self.seed, self.position])
        self.jobs = 0

    def draw_failure(self) -> bool:
        """Whether the next job fails (one draw per job, whatever the rate: a fixed sequence)."""
        return bool(self.rng.random() < self.spec.failure_rate)

    def job_seed(self) -> int:
        """The torch seed of the current job (dropout), from (seed, position, job)."""
        return int(np.random.SeedSequence([self.seed, self.position, self.jobs]).generate_state(1)[0])

    def pull(self, coordinator: ExpertCoordinator, model: ExpertModel) -> int:
        """Load the expert's current adapter and correction into ``model``; returns its version."""
        snap = coordinator.snapshot(self.spec.specialty, copy=False)
        model.load_expert(self.spec.specialty, snap.adapter, snap.correction)
        return snap.version

    def train(self, model: ExpertModel, steps: int, lr: float) -> LocalResult:
        """``steps`` optimizer steps on the expert's LoRA over the worker's next batches."""
        return model.train_steps(self.spec.specialty, self.stream, steps, lr)

    def update(self, base_version: int, result: LocalResult) -> Update:
        """The update to push: trained factors (on CPU), the pulled version, the sample count."""
        weights = {k: v.detach().to("cpu") for k, v in result.state.items()}
        return Update(self.spec.specialty, self.spec.id, base_version, weights, self.num_samples)


# ------------------------------------------------------------------------------------ history


@dataclass(frozen=True)
class Event:
    """One job's outcome. ``time``: when it was pushed (or lost), ``start``: when it pulled, on the
    run's clock; ``status``: the coordinator's receipt (``applied``, ``pending``, ``refused``),
    ``failed`` (a drawn failure: nothing pushed) or ``flushed`` (a partial round applied at the
    end, worker ""). ``seconds``: measured compute time (not compared: it is not reproducible)."""

    time: float
    start: float
    worker: str
    expert: str
    status: Status
    base_version: int | None = None
    version: int | None = None
    staleness: int | None = None
    loss: float | None = None
    steps: int = 0
    response_tokens: int = 0
    reason: str | None = None
    seconds: float = field(default=0.0, compare=False)


@dataclass
class History:
    """Every event of a run, in the order they happened."""

    clock: str
    duration: float
    events: list[Event] = field(default_factory=list)

    def by_expert(self) -> dict[str, list[Event]]:
        out: dict[str, list[Event]] = {}
        for ev in self.events:
            out.setdefault(ev.expert, []).append(ev)
        return out

    def counts(self) -> dict[str, int]:
        """Jobs by status, plus ``pushed`` (applied + pending + refused)."""
        c = Counter(ev.status for ev in self.events)
        out = {s: c.get(s, 0) for s in ("applied", "pending", "refused", "failed", "flushed")}
        out["pushed"] = out["applied"] + out["pending"] + out["refused"]
        return out

    def per_worker(self) -> dict[str, Counter]:
        """Per worker, its jobs by status."""
        out: dict[str, Counter] = {}
        for ev in self.events:
            if ev.worker:
                out.setdefault(ev.worker, Counter())[ev.status] += 1
        return out


# ------------------------------------------------------------------------------------ the run


def run_federation(
    coordinator: ExpertCoordinator,
    model: ExpertModel | ModelPool,
    workers: Sequence[WorkerSpec],
    data: Mapping[str, Iterable[Batch]],
    clock: Clock,
    duration: float,
    steps_per_update: int = 1,
    lr: float = 2e-4,
    seed: int = 0,
    flush: bool = False,
    on_event: Callable[[Event], None] | None = None,
) -> History:
    """Federate the workers' experts for ``duration`` seconds of ``clock``.

    Every expert a worker names is registered with the coordinator (kept as it is when already
    there, e.g. resumed). Each worker loops: while the clock is below ``duration`` it starts a job
    (module docstring); a started job always finishes and pushes, so no trained update is lost at
    the deadline. ``data[worker.id]`` are the worker's batches. ``flush``: apply the partial sync
    rounds / FedBuff buffers left at the end. ``on_event`` sees every event as it happens (loggers).
    """
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not (math.isfinite(duration) and duration > 0):
        raise ConfigError(f"duration must be a finite number of seconds > 0, got {duration!r}")
    if isinstance(steps_per_update, bool) or not isinstance(steps_per_update, int) or steps_per_update < 1:
        raise ConfigError(f"steps_per_update must be an integer >= 1, got {steps_per_update!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    source = model if isinstance(model, ExpertModel) else model.models()[0]
    specs = resolve_workers(workers, source.experts)
    pool = model if isinstance(model, ModelPool) else ModelPool.per_device(model, specs)
    need = coordinator.rank_budget + coordinator.rank_slack
    for m in pool.models():
        if m.correction_rank < need:
            raise ConfigError(
                f"the model's correction_rank={m.correction_rank} is below the coordinator's rank_budget + rank_slack "
                f"= {need}; raise correction_rank or lower rank_budget"
            )
    missing = [s.id for s in specs if s.id not in data]
    if missing:
        raise ConfigError(f"worker {missing[0]!r} has no data; give data[{missing[0]!r}] (its private batches)")
    experts = [e for e in source.experts if any(s.specialty == e for s in specs)]
    for name in experts:
        coordinator.register(name, source.expert_state(name), source.adapted_layers(name))
    history = History(clock.name, float(duration))
    lock = threading.Lock()

    def record(ev: Event) -> None:
        with lock:
            history.events.append(ev)
            if on_event is not None:
                on_event(ev)

    def process(w: Worker) -> Process:
        spec = w.spec
        while clock.now() < duration and not clock.stopped():
            start = clock.now()
            failed = w.draw_failure()
            version, result, measured = None, None, 0.0
            if not (failed and clock.deterministic):
                with pool.lease(spec.id) as m:
                    t = time.perf_counter()
                    version = w.pull(coordinator, m)
                    with _seeded(w.job_seed(), model_device(m), clock.deterministic):
                        result = w.train(m, steps_per_update, lr)
                    measured = time.perf_counter() - t
            w.jobs += 1
            yield clock.delay(steps_per_update, spec.speed, spec.latency, measured)
            common = dict(time=clock.now(), start=start, worker=spec.id, expert=spec.specialty, base_version=version,
                          seconds=measured)
            if failed:
                record(Event(status="failed", steps=0 if result is None else result.steps, **common))
                continue
            receipt = coordinator.push(w.update(version, result))
            record(Event(
                status=receipt.status, version=receipt.version, staleness=receipt.staleness, loss=result.mean_loss,
                steps=result.steps, response_tokens=result.response_tokens, reason=receipt.reason, **common,
            ))

    runners = [
        Worker(s, data[s.id], seed=seed, position=i, device=model_device(pool.model(s.id))) for i, s in enumerate(specs)
    ]
    clock.run([process(w) for w in runners])
    if flush:
        for name in experts:
            receipt = coordinator.flush(name)
            if receipt is not None:
                t = clock.now()
                record(Event(t, t, "", name, "flushed", version=receipt.version))
    return history


@contextmanager
def _seeded(seed: int, device: torch.device, enabled: bool) -> Iterator[None]:
    """Torch's global generators seeded for one job, restored afterwards (single-threaded runs only)."""
    if not enabled:
        yield
        return
    devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
