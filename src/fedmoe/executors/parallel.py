"""A round's clients on persistent worker processes, one per device (``cpu:N`` or GPU ids).

Each worker is a spawned process that builds the client module, the data module and a
:class:`~fedmoe.executors.sequential.Sequential` executor once and keeps them between rounds; a round's
tasks are dealt to the workers (largest clients first, each to the least loaded worker) and every
worker trains its clients exactly as the sequential executor would. A client's randomness depends on
(seed, round, client id) alone (:func:`~fedmoe.executors.base.client_rng`,
:meth:`~fedmoe.data.federated.FederatedDataModule.client_train_loader`), so on the CPU, with one torch
thread on both sides, the results are bit-identical to :class:`Sequential`'s.

How objects reach the workers. The module and the data module that :meth:`Parallel.bind` receives
are pickled in this process (no config is re-read): the module's tensors as a private copy per
worker, the data module's tensors once into shared memory that every worker maps. Weights travel the
same way each round: every tensor of the round's tasks (plans, regularizer anchors, optimizer
states) is copied once into one flat shared-memory buffer per dtype (64-byte aligned slots, as
torch's allocator aligns) and each worker receives views of it; a weights dict shared by all
clients (FedAvg's global model) is copied once per round, not once per client. Results come back
the same way. Only pickled metadata travels through the pipes. An optimizer given in the config
(jsonargparse's ``class_path`` partial) travels as a plain ``functools.partial`` of its class; a
lambda cannot be pickled and is refused at :meth:`bind` with the reason.

A worker that dies (killed, out of memory) is restarted; the clients it had not finished are run
once more on the new worker, and a client whose worker dies again is a
:class:`~fedmoe.executors.base.ClientFailure`, so the loop's ``min_clients`` policy applies.
:meth:`Parallel.close` stops every worker; workers are daemonic and also stop when the executor is
garbage collected or the interpreter exits. Workers are spawned, so a script that uses this executor
needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import io
import logging
import os
import pickle
import re
import sys
import threading
import weakref
from dataclasses import dataclass, field, replace
from multiprocessing import util as mp_util
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

from fedmoe.errors import ConfigError
from fedmoe.executors.base import ClientFailure, ClientOutcome, ClientTask, Executor

log = logging.getLogger(__name__)

_KEY = "federation.executor.devices"
_HOW = "use cpu:N (N worker processes on the CPU) or a list of GPU ids such as [0, 1]"
_ALIGN = 64
"""Bytes each tensor's slot in a shared buffer is aligned to (as torch's CPU allocator aligns)."""
_START_LOCK = threading.Lock()


def parse_devices(devices: Any) -> list[str]:
    """The torch device of each worker: ``cpu:N`` gives N ``"cpu"`` workers, ``[0, 1]`` CUDA devices 0 and 1.

    Raises :class:`ConfigError` for a malformed value, ``cpu:0``, more CPU workers than cores, or a GPU
    id this machine does not have.
    """
    if isinstance(devices, str):
        match = re.fullmatch(r"\s*cpu\s*:\s*(\d+)\s*", devices.lower())
        if match is None:
            raise ConfigError(f"{_KEY}={devices!r} is not a device list: {_HOW}")
        n = int(match.group(1))
        if n < 1:
            raise ConfigError(f"{_KEY}={devices!r} starts no worker: {_HOW}, with N >= 1")
        cores = os.cpu_count() or 1
        if n > cores:
            raise ConfigError(
                f"{_KEY}={devices!r} asks for {n} CPU workers but this machine has {cores} cores: at most one "
                f"worker per core (use cpu:{cores} or fewer)"
            )
        return ["cpu"] * n
    if (isinstance(devices, (list, tuple)) and devices
            and all(isinstance(d, int) and not isinstance(d, bool) for d in devices)):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for d in devices:
            if not 0 <= d < count:
                have = ("no CUDA GPU: use cpu:N (N worker processes on the CPU)" if count == 0 else
                        f"{count} CUDA device(s): use ids in 0..{count - 1}, or cpu:N")
                raise ConfigError(f"{_KEY}={list(devices)}: there is no GPU {d}; this machine has {have}")
        if len(set(devices)) != len(devices):
            raise ConfigError(f"{_KEY}={list(devices)} names a GPU twice: one worker per device, each id once")
        return [f"cuda:{d}" for d in devices]
    raise ConfigError(f"{_KEY}={devices!r} is not a device list: {_HOW}")


class Parallel(Executor):
    """Trains a round's clients on persistent worker processes, one per device.

    The workers start with the first round (or :meth:`start`), so that round's time includes their
    start-up (seconds: an interpreter, torch and Lightning per worker); ``validate`` and ``test``,
    which bind but run no round, start none.

    Args:
        devices: ``cpu:N`` (N worker processes on the CPU, one torch thread each; N at most the
            number of cores) or a list of GPU ids (``[0, 1]``: one worker per GPU).
    """

    def __init__(self, devices: str | list[int] = "cpu:2") -> None:
        self.devices = devices
        self.device_list = parse_devices(devices)
        self._workers = [_Worker(i, d) for i, d in enumerate(self.device_list)]
        self._payload: _Payload | None = None
        self._generation = 0
        self.restarts = 0
        """Workers restarted after dying, over the executor's life."""
        self.reruns = 0
        """Client tasks run a second time because their worker died."""
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    # -- setup ------------------------------------------------------------------------------------

    def bind(self, module, datamodule, settings) -> None:
        """Pickle what the workers build (the errors of unpicklable objects surface here); running
        workers rebuild from it before their next round, new ones are started by :meth:`start`."""
        super().bind(module, datamodule, settings)
        datamodule.setup("fit")
        self._payload = _Payload.build(module, datamodule, settings)
        self._generation += 1

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers, in worker order."""
        return [w.process.pid for w in self._workers if w.alive()]

    def start(self) -> None:
        """Start the workers that are not running and bring every worker up to the last :meth:`bind`
        (called by :meth:`run`; call it to pay the start-up before the first round)."""
        if self._payload is None:
            raise RuntimeError("Parallel.start() before bind()")
        for w in self._workers:
            if not w.alive():
                self._spawn(w)
        for w in self._workers:
            if w.generation != self._generation:
                self._bind_worker(w)

    def close(self) -> None:
        """Stop every worker process (they are started again by the next :meth:`run`)."""
        _stop_workers(self._workers)

    # -- running ----------------------------------------------------------------------------------

    def run(self, tasks: list[ClientTask]) -> list[ClientOutcome | ClientFailure]:
        if not tasks:
            return []
        self.start()
        out: list[ClientOutcome | ClientFailure | None] = [None] * len(tasks)
        attempts = [0] * len(tasks)
        pending: dict[int, list[int]] = {}
        dealt = self._deal(tasks)
        packer = _Packer()
        try:
            blobs = {w.index: packer.dumps([(p, tasks[p]) for p in dealt[w.index]])
                     for w in self._workers if dealt[w.index]}
        except _Unpicklable as e:
            raise ConfigError(
                f"federation.executor parallel cannot send this algorithm's client plans to its workers ({e}); "
                "use federation.executor sequential"
            ) from None
        packed = packer.pack()
        for w in self._workers:
            w.received = 0
            if dealt[w.index]:
                pending[w.index] = list(dealt[w.index])
                self._send_tasks(w, blobs[w.index], packed)
        while any(pending.values()):
            busy = [w for w in self._workers if pending.get(w.index)]
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for w in busy:
                if w.conn not in ready and w.process.sentinel not in ready:
                    continue
                if self._collect(w, pending[w.index], out):
                    self._recover(w, tasks, pending[w.index], attempts, out)
        return [o if o is not None else ClientFailure(t.client_id, "no result came back from its worker")
                for o, t in zip(out, tasks)]

    def _deal(self, tasks: list[ClientTask]) -> list[list[int]]:
        """Task positions per worker: largest clients first, each to the worker with the fewest samples
        so far (ties: the lower worker index); the same tasks are always dealt the same way."""
        def size(task: ClientTask) -> int:
            try:
                return len(self.datamodule.splits.client_train[task.client_id])
            except Exception:
                return 1

        sizes = [size(t) for t in tasks]
        loads = [0] * len(self._workers)
        dealt: list[list[int]] = [[] for _ in self._workers]
        for pos in sorted(range(len(tasks)), key=lambda p: (-sizes[p], p)):
            w = min(range(len(loads)), key=lambda i: (loads[i], i))
            dealt[w].append(pos)
            loads[w] += max(sizes[pos], 1)
        return [sorted(d) for d in dealt]

    def _send_tasks(self, w: "_Worker", blob: bytes, packed: "_Packed") -> None:
        try:
            w.conn.send(("train", blob, packed))
        except (OSError, ValueError) as e:  # the worker died; _collect sees it
            log.warning("sending tasks to worker %d failed: %s", w.index, e)

    def _collect(self, w: "_Worker", positions: list[int], out: list) -> bool:
        """Read the worker's finished clients into ``out``; True if the worker died."""
        try:
            while positions and w.conn.poll():
                kind, pos, blob, packed = w.conn.recv()
                out[pos] = _loads(blob, packed)
                positions.remove(pos)
                w.received += 1
        except Exception as e:  # EOF, a broken pipe, or buffers of a worker that is gone
            log.debug("worker %d: %s: %s", w.index, type(e).__name__, e)
            return True
        return bool(positions) and not w.process.is_alive()

    def _recover(self, w: "_Worker", tasks: list[ClientTask], positions: list[int], attempts: list[int], out) -> None:
        """Restart a dead worker and resend its unfinished clients. A worker trains its clients in the
        order sent, so the first unfinished one was training when it died: it is rerun once, and is a
        :class:`ClientFailure` if its worker dies again; the others had not started. A worker left
        with nothing to do is restarted by the next :meth:`run`."""
        code = w.process.exitcode if w.process is not None else None
        pid = w.process.pid if w.process is not None else None
        self.restarts += 1
        if not positions:
            return
        running = positions[0]
        attempts[running] += 1
        if attempts[running] > 1:
            out[running] = ClientFailure(tasks[running].client_id, f"worker {w.index} ({w.device}) died twice while "
                                                                   f"training it (exit code {code})")
            positions.pop(0)
        else:
            self.reruns += 1
        log.warning("worker %d (%s, pid %s) died (exit code %s) while training client %d; clients %s go to "
                    "a new worker", w.index, w.device, pid, code, tasks[running].client_id,
                    [tasks[p].client_id for p in positions])
        if not positions:  # the next run starts it
            w.stop()
            return
        try:
            self._spawn(w)
            self._bind_worker(w)
        except Exception as e:
            for p in positions:
                out[p] = ClientFailure(tasks[p].client_id, f"worker {w.index} could not be restarted: {e}")
            positions.clear()
            return
        if positions:
            packer = _Packer()
            blob = packer.dumps([(p, tasks[p]) for p in positions])
            self._send_tasks(w, blob, packer.pack())

    # -- processes --------------------------------------------------------------------------------

    def _spawn(self, w: "_Worker") -> None:
        w.stop()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        threads = 1 if w.device == "cpu" else max(1, (os.cpu_count() or 1) // len(self._workers))
        process = ctx.Process(target=_worker_main, args=(child, w.device, threads), daemon=True,
                              name=f"fedmoe-parallel-{w.index}")
        with _START_LOCK, _environment(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                                       OMP_WAIT_POLICY="PASSIVE"):
            process.start()
        child.close()
        w.process, w.conn, w.generation = process, parent, -1

    def _bind_worker(self, w: "_Worker") -> None:
        """Send the worker what to build and wait until it has built it."""
        settings = self._payload.settings_for(w.device)
        w.conn.send(("bind", *self._payload.module_message(), *self._payload.data_message(), settings))
        while True:
            ready = wait([w.conn, w.process.sentinel])
            if w.conn in ready:
                try:
                    reply = w.conn.recv()
                except (EOFError, OSError):
                    reply = None
                if reply is not None and reply[0] == "ready":
                    w.generation, w.threads = self._generation, reply[1]
                    return
                if reply is not None and reply[0] == "error":
                    w.stop()
                    raise ConfigError(
                        f"federation.executor parallel: worker {w.index} ({w.device}) could not build the model and "
                        f"data module: {reply[1]}; they must be importable classes (or use federation.executor sequential)"
                    )
            if not w.process.is_alive():
                code = w.process.exitcode
                w.stop()
                raise RuntimeError(f"federation.executor parallel: worker {w.index} ({w.device}) exited with code "
                                   f"{code} while starting")


@dataclass
class _Worker:
    index: int
    device: str
    process: Any = None
    conn: Any = None
    generation: int = -1
    """The bind generation whose module and data the worker holds (-1: none)."""
    received: int = 0
    """Clients received back from it in the current round."""
    threads: int = 0
    """Torch threads the worker reported when it was last bound."""

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the process to exit; terminate, then kill, what does not; close the pipe."""
        process, conn = self.process, self.conn
        if process is not None and process.is_alive() and conn is not None:
            with contextlib.suppress(Exception):
                conn.send(("stop",))
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                process.terminate()
                process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()
            with contextlib.suppress(Exception):
                process.close()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        self.process, self.conn, self.generation = None, None, -1


def _stop_workers(workers: list[_Worker]) -> None:
    for w in workers:
        w.stop()


@contextlib.contextmanager
def _environment(**values: str):
    """Environment variables set while a worker starts (its OpenMP reads them at import)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- what travels -----------------------------------------------------------------------------------


@dataclass
class _Packed:
    """Tensors as views of flat shared-memory buffers: ``refs[i]`` = (dtype, offset, shape, kind)."""

    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    refs: list[tuple[str, int, tuple[int, ...], int]] = field(default_factory=list)

    def tensor(self, i: int) -> torch.Tensor:
        dtype, offset, shape, kind = self.refs[i]
        n = 1
        for s in shape:
            n *= s
        t = self.buffers[dtype][offset : offset + n].view(shape)
        return t if kind == 0 else nn.Parameter(t, requires_grad=kind == 2)


class _Packer:
    """Pickles objects with their tensors set aside, then packs those tensors into shared buffers."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.index: dict[int, int] = {}

    def dumps(self, obj: Any) -> bytes:
        f = io.BytesIO()
        try:
            _Pickler(f, self).dump(obj)
        except Exception as e:
            raise _Unpicklable(f"{type(e).__name__}: {e}") from None
        return f.getvalue()

    def pack(self, copy: bool = True) -> _Packed:
        """One flat shared buffer per dtype holding every tensor set aside (a 64-byte aligned slot each)."""
        totals: dict[str, int] = {}
        slots = []
        for t in self.tensors:
            key = str(t.dtype).removeprefix("torch.")
            step = max(1, _ALIGN // t.element_size())
            offset = -(-totals.get(key, 0) // step) * step
            totals[key] = offset + t.numel()
            kind = 0 if type(t) is torch.Tensor else (2 if t.requires_grad else 1)
            slots.append((key, offset, tuple(t.shape), kind))
        buffers = {k: torch.empty(n, dtype=getattr(torch, k)).share_memory_() for k, n in totals.items()}
        packed = _Packed(buffers, slots)
        if copy:
            with torch.no_grad():
                for i, t in enumerate(self.tensors):
                    key, offset, shape, _ = slots[i]
                    buffers[key][offset : offset + t.numel()].view(shape).copy_(t.detach())
        return packed


class _Unpicklable(Exception):
    pass


class _Pickler(pickle.Pickler):
    """Sets plain tensors and parameters aside (persistent ids) and makes two common unpicklable
    things portable: a LightningModule's Fabric references, and jsonargparse's optimizer partials."""

    def __init__(self, file, packer: _Packer) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.packer = packer

    def persistent_id(self, obj: Any) -> Any:
        if (type(obj) in (torch.Tensor, nn.Parameter) and obj.layout == torch.strided and not obj.is_quantized
                and obj.device.type != "meta"):
            index = self.packer.index.get(id(obj))
            if index is None:
                index = self.packer.index[id(obj)] = len(self.packer.tensors)
                self.packer.tensors.append(obj)
            return index
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, functools.partial) and _is_jsonargparse_partial(obj):
            return functools.partial(obj.args[1], *obj.args[2:], **obj.keywords).__reduce__()
        if isinstance(obj, nn.Module) and hasattr(obj, "_fabric") and hasattr(obj, "__getstate__"):
            state = dict(obj.__getstate__())
            state["_fabric"], state["_fabric_optimizers"] = None, []
            return copyreg._reconstructor, (type(obj), object, None), state
        return NotImplemented


def _is_jsonargparse_partial(obj: functools.partial) -> bool:
    """``partial(call_without_instantiate_context, instantiator, cls, **init_args)``: a class from the
    config whose instantiators only ever apply to Lightning classes."""
    func = obj.func
    return (getattr(func, "__name__", "") == "call_without_instantiate_context"
            and getattr(func, "__module__", "").startswith("jsonargparse") and len(obj.args) >= 2
            and isinstance(obj.args[1], type))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, packed: _Packed, own: bool) -> None:
        super().__init__(file)
        self.packed = packed
        self.own = own
        self.cache: dict[int, torch.Tensor] = {}

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if pid not in self.cache:
            t = self.packed.tensor(pid)
            if self.own:
                t = nn.Parameter(t.detach().clone(), t.requires_grad) if isinstance(t, nn.Parameter) else t.clone()
            self.cache[pid] = t
        return self.cache[pid]


def _loads(blob: bytes, packed: _Packed, own: bool = False) -> Any:
    """The object pickled in ``blob``, its tensors views of ``packed`` (``own``: private copies)."""
    return _Unpickler(io.BytesIO(blob), packed, own).load()


def _dumps(obj: Any) -> tuple[bytes, _Packed]:
    packer = _Packer()
    blob = packer.dumps(obj)
    return blob, packer.pack()


@dataclass
class _Payload:
    """What every worker builds: the module (a private copy per worker) and the data module (shared)."""

    module_blob: bytes
    module_tensors: list[torch.Tensor]
    data_blob: bytes
    data_packer: _Packer
    settings: Any
    data_packed: _Packed | None = None

    @classmethod
    def build(cls, module, datamodule, settings) -> "_Payload":
        packer = _Packer()
        try:
            module_blob = packer.dumps(module)
        except _Unpicklable as e:
            raise ConfigError(
                f"federation.executor parallel sends the model to its worker processes, but it cannot be pickled "
                f"({e}): give model.optimizer as a class_path (not a lambda), or use federation.executor sequential"
            ) from None
        tensors = [t.detach().to("cpu", copy=True) for t in packer.tensors]
        for i, t in enumerate(packer.tensors):
            if isinstance(t, nn.Parameter):
                tensors[i] = nn.Parameter(tensors[i], t.requires_grad)
        data = _Packer()
        try:
            data_blob = data.dumps(datamodule)
        except _Unpicklable as e:
            raise ConfigError(
                f"federation.executor parallel sends the data module to its worker processes, but it cannot be "
                f"pickled ({e}): use module-level functions and classes in it, or federation.executor sequential"
            ) from None
        return cls(module_blob, tensors, data_blob, data, settings)

    def module_message(self) -> tuple[bytes, _Packed]:
        """The module with a fresh copy of its tensors (each worker trains its own)."""
        packer = _Packer()
        packer.tensors = self.module_tensors
        return self.module_blob, packer.pack()

    def data_message(self) -> tuple[bytes, _Packed]:
        """The data module; its tensors are copied into shared memory once, for all workers."""
        if self.data_packed is None:
            self.data_packed = self.data_packer.pack()
            self.data_packer.tensors = []
        return self.data_blob, self.data_packed

    def settings_for(self, device: str):
        if device == "cpu":
            return replace(self.settings, accelerator="cpu", devices=1)
        return replace(self.settings, accelerator="cuda", devices=[int(device.split(":")[1])])


# -- the worker process ---------------------------------------------------------------------------------


def _worker_main(conn, device: str, threads: int) -> None:
    """A worker: build what ``bind`` sends, then train the clients of each ``train`` message one by one,
    sending each client's outcome as soon as it is done; exit on ``stop`` or when the parent is gone."""
    from fedmoe.executors.sequential import Sequential

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    executor: Sequential | None = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            _exit()
        kind = message[0]
        if kind == "stop":
            _exit()
        if kind == "bind":
            _, module_blob, module_packed, data_blob, data_packed, settings = message
            try:
                module = _loads(module_blob, module_packed, own=True)
                datamodule = _loads(data_blob, data_packed)
                executor = Sequential()
                executor.bind(module, datamodule, settings)
            except Exception as e:
                executor = None
                conn.send(("error", f"{type(e).__name__}: {e}"))
                continue
            conn.send(("ready", torch.get_num_threads()))
        elif kind == "train":
            _, blob, packed = message
            items = _loads(blob, packed)
            for pos, task in items:
                try:
                    outcome = executor.run([task])[0]
                except BaseException:  # SystemExit, KeyboardInterrupt: the worker ends, as in a crash
                    _exit(1)
                try:
                    reply = _dumps(outcome)
                except _Unpicklable as e:
                    reply = _dumps(ClientFailure(task.client_id, f"its result cannot be sent back: {e}"))
                conn.send(("done", pos, *reply))
            del items


def _exit(code: int = 0) -> None:
    """Leave at once after multiprocessing's own clean-up: the interpreter's normal shutdown (torch's
    thread pools, static destructors) can take seconds, and a worker has nothing left to save."""
    with contextlib.suppress(Exception):
        mp_util._exit_function()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
