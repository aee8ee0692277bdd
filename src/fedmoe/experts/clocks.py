"""The two clocks a federation of workers runs under (DESIGN.md §4): simulated and wall.

A worker is a *process*: a generator that does one job's real work (pull, train) when resumed,
then yields the seconds the clock must let pass before it pushes (the job's cost on this clock),
and pushes when resumed again. The same processes run on either clock:

- :class:`SimulatedClock`: a deterministic event queue. Real work takes no simulated time; a job
  started at t is pushed at t + steps / speed * step_cost + latency. Events are ordered by
  (time, worker position, sequence number), so ties are broken the same way on every run; with
  seeded failures and data the whole run is reproducible (used by the tests and the CPU studies).
- :class:`WallClock`: one real thread per worker, really concurrent (on CPU each thread runs torch
  with ``torch_threads`` intra-op threads, one by default: oversubscribed OpenMP threads slow
  training several-fold). The measured compute time m is real; a worker slower than the hardware
  (speed < 1) sleeps m (1 / speed - 1) more, a faster one cannot be sped up (speed > 1 waits 0);
  the latency is slept before the push. Threads, not processes: torch releases the GIL inside its
  kernels, and the coordinator (one lock per expert) is shared in memory, with no IPC. Workers
  sharing one model take turns on it (:class:`~fedmoe.experts.workers.ModelPool`); with one worker
  per GPU, or a model copy per CPU worker, they train at the same time.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from fedmoe.errors import ConfigError

#: A worker's process: resumed to do a job's real work, it yields the seconds to wait before the push.
Process = Iterator[float]


class Clock(Protocol):
    """What :func:`fedmoe.experts.workers.run_federation` needs of a clock."""

    name: str
    deterministic: bool

    def now(self) -> float:
        """Seconds since the run started, on this clock."""

    def stopped(self) -> bool:
        """True once a process failed: the others start no new job."""

    def delay(self, steps: int, speed: float, latency: float, measured: float) -> float:
        """Seconds between the end of a job's real work (``measured`` seconds of it) and its push."""

    def run(self, processes: Sequence[Process]) -> None:
        """Run every process to its end (processes stop themselves when the time is up)."""


class SimulatedClock:
    """A deterministic event queue: a job of ``steps`` optimizer steps costs
    ``steps / speed * step_cost + latency`` simulated seconds, whatever it really took.

    Args:
        step_cost: simulated seconds of one optimizer step at speed 1 (> 0).
    """

    name = "simulated"
    deterministic = True

    def __init__(self, step_cost: float = 1.0) -> None:
        if not (isinstance(step_cost, (int, float)) and step_cost > 0 and step_cost < float("inf")):
            raise ConfigError(f"simulated clock step_cost must be a finite number > 0, got {step_cost!r}")
        self.step_cost = float(step_cost)
        self._now = 0.0

    def now(self) -> float:
        return self._now

    def stopped(self) -> bool:
        return False

    def delay(self, steps: int, speed: float, latency: float, measured: float) -> float:
        return steps / speed * self.step_cost + latency

    def run(self, processes: Sequence[Process]) -> None:
        """Resume the process whose event is earliest (ties: lower position first); an exception in
        a process ends the run at once."""
        self._now = 0.0
        seq = itertools.count()
        queue = [(0.0, i, next(seq)) for i in range(len(processes))]
        heapq.heapify(queue)
        while queue:
            t, i, _ = heapq.heappop(queue)
            self._now = t
            try:
                wait = next(processes[i])
            except StopIteration:
                continue
            heapq.heappush(queue, (t + float(wait), i, next(seq)))


class WallClock:
    """Real time, one thread per process, really concurrent.

    Args:
        torch_threads: torch intra-op threads during the run (process-wide; restored afterwards).
    """

    name = "wall"
    deterministic = False

    def __init__(self, torch_threads: int = 1) -> None:
        if not isinstance(torch_threads, int) or isinstance(torch_threads, bool) or torch_threads < 1:
            raise ConfigError(f"wall clock torch_threads must be an integer >= 1, got {torch_threads!r}")
        self.torch_threads = torch_threads
        self._t0 = time.monotonic()
        self._stop = threading.Event()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def stopped(self) -> bool:
        return self._stop.is_set()

    def delay(self, steps: int, speed: float, latency: float, measured: float) -> float:
        return (measured * (1.0 / speed - 1.0) if speed < 1.0 else 0.0) + latency

    def run(self, processes: Sequence[Process]) -> None:
        """One thread per process; the first exception stops the others (after their current job)
        and is raised here once every thread has ended."""
        self._t0 = time.monotonic()
        self._stop.clear()
        errors: list[BaseException] = []

        def drive(process: Process) -> None:
            try:
                for wait in process:
                    if wait > 0:
                        self._stop.wait(float(wait))  # cut short when stopping: the job is still pushed
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                self._stop.set()

        previous = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            threads = [threading.Thread(target=drive, args=(p,), name=f"fedmoe-worker-{i}", daemon=True)
                       for i, p in enumerate(processes)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        finally:
            torch.set_num_threads(previous)
        if errors:
            raise errors[0]


def make_clock(name: str, step_cost: float = 1.0, torch_threads: int = 1) -> SimulatedClock | WallClock:
    """A clock by name: ``simulated`` or ``wall``."""
    if name == "simulated":
        return SimulatedClock(step_cost)
    if name == "wall":
        return WallClock(torch_threads)
    raise ConfigError(f"clock {name!r} is unknown; use 'simulated' or 'wall'")
