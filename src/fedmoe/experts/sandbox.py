"""Run untrusted Python programs (a generated solution plus its test asserts) in a sandboxed subprocess.

Each program runs in a fresh interpreter (``python -I -B``: isolated mode, no bytecode written) in a
temporary working directory, with an empty environment (no inherited variables, so no secrets), its
stdout and stderr written to files whose tails are kept, and these limits:

- wall clock: ``timeout_s``; on expiry the whole process group is killed (SIGKILL);
- CPU time (``RLIMIT_CPU``), address space (``RLIMIT_AS``), file size (``RLIMIT_FSIZE``, which also
  caps the captured output), open files (``RLIMIT_NOFILE``), no core dumps;
- network: a new network namespace (``unshare --net``: only a loopback that is down, so every
  connection fails), plus a guard that makes ``socket.socket(...)`` raise before any packet;
- processes: a new PID namespace (``unshare --pid --fork --kill-child``: when the program ends or
  is killed, the kernel kills every process it started, even ones that left its process group),
  an unprivileged user id per worker slot (``setpriv``) so that ``RLIMIT_NPROC`` really bounds
  forks (root ignores it), plus a guard that makes ``os.fork``, ``os.system``, ``subprocess`` and
  ``multiprocessing`` raise.

Which of these the machine allows is probed once (:func:`detect_isolation`): as root with
``unshare`` and ``setpriv``, all of them; as another user with user namespaces, ``unshare
--map-root-user`` gives the network and PID namespaces but no separate user (``RLIMIT_NPROC`` is not
set: it would count every process of the user); without ``unshare``, only the guards, the rlimits
and the process-group kill. :attr:`Isolation.description` says which. The guards are Python-level
(a program using ``ctypes`` gets past them); the namespaces and rlimits are not.

A program that hangs, forks, allocates without bound, floods its output or opens a socket ends as
a recorded :class:`SandboxResult` (``timeout`` or ``error`` with its kind), never a hung harness.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Literal

from fedmoe.errors import ConfigError

Status = Literal["passed", "failed", "timeout", "error"]
BLOCKED = "is disabled in the sandbox"
SANDBOX_UID_BASE = 61000
SYSTEM_PYTHON = "/usr/bin/python3"

#: Runs in the sandboxed interpreter before the program: limits, guards, then the program itself
#: compiled as ``solution.py`` in fresh globals. ``sys.argv[1]`` is a JSON document of settings.
BOOTSTRAP = r"""
import json, os, resource, signal, sys
_cfg = json.loads(sys.argv[1])
for _name, _soft, _hard in _cfg["rlimits"]:
    resource.setrlimit(getattr(resource, _name), (_soft, _hard))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
def _cpu_limit(signum, frame):
    os.write(2, b"\nCPU time limit exceeded\n")
    os._exit(128 + signum)
signal.signal(signal.SIGXCPU, _cpu_limit)
def _blocked(what):
    def f(*args, **kwargs):
        raise PermissionError(what + " BLOCKED")
    return f
import socket, _posixsubprocess
socket.socket.__init__ = _blocked("network access")
for _name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve", "execl",
              "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked("process creation (os." + _name + ")"))
_posixsubprocess.fork_exec = _blocked("process creation (subprocess)")
os.chdir(_cfg["cwd"])
with open(_cfg["program"], encoding="utf-8") as _f:
    _source = _f.read()
sys.argv = ["solution.py"]
import builtins
_globals = {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"}
for _k in [k for k in globals() if k.startswith("_") and k not in ("__name__", "__builtins__", "_globals", "_source")]:
    del globals()[_k]
exec(compile(_source, "solution.py", "exec"), _globals)
""".replace("BLOCKED", BLOCKED)


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use.

    Args:
        timeout_s: wall-clock seconds before the program is killed. Twice ``cpu_s`` by default: on
            a loaded machine a program gets less than a core (MBPP task 123's reference solution
            needs 4 s of CPU and took 8-10 s of wall clock with 2 sandbox workers on a busy 2-core machine).
        cpu_s: CPU seconds (``RLIMIT_CPU``; SIGXCPU ends the program); None: ceil(timeout_s).
        memory_mb: address space (``RLIMIT_AS``) in MiB; an allocation beyond it raises MemoryError.
        processes: ``RLIMIT_NPROC`` (processes and threads of the sandbox's user id), where a
            separate user id is available.
        output_bytes: bytes of the tail of stdout and of stderr kept in the result.
        file_mb: largest file the program may write (``RLIMIT_FSIZE``), its captured output included.
        open_files: ``RLIMIT_NOFILE``.
    """

    timeout_s: float = 20.0
    cpu_s: int | None = 10
    memory_mb: int = 512
    processes: int = 16
    output_bytes: int = 2048
    file_mb: int = 16
    open_files: int = 64

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"sandbox timeout_s must be a finite number of seconds > 0, got {self.timeout_s!r}")
        for key, low in (("cpu_s", 1), ("memory_mb", 16), ("processes", 1), ("output_bytes", 0), ("file_mb", 1),
                         ("open_files", 8)):
            value = getattr(self, key)
            if key == "cpu_s" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"sandbox {key} must be an integer >= {low}, got {value!r}")

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else max(1, math.ceil(self.timeout_s))

    def rlimits(self, nproc: bool) -> list[tuple[str, int, int]]:
        """``(name, soft, hard)`` for the bootstrap; the CPU hard limit is one second above the soft
        one so that SIGXCPU (not SIGKILL) ends the program."""
        mb = 1024 * 1024
        out = [
            ("RLIMIT_CORE", 0, 0),
            ("RLIMIT_AS", self.memory_mb * mb, self.memory_mb * mb),
            ("RLIMIT_CPU", self.cpu_seconds, self.cpu_seconds + 1),
            ("RLIMIT_FSIZE", self.file_mb * mb, self.file_mb * mb),
            ("RLIMIT_NOFILE", self.open_files, self.open_files),
        ]
        if nproc:
            out.append(("RLIMIT_NPROC", self.processes, self.processes))
        return out


@dataclass
class SandboxResult:
    """One program's outcome.

    ``status``: ``passed`` (exit code 0), ``failed`` (an AssertionError: a test did not hold),
    ``timeout`` (wall clock or CPU limit) or ``error`` (any other exception or signal; in a PID
    namespace ``unshare`` reports a death by signal as exit code 1, kind ``exit:1``). ``kind``
    names the failure: the exception's type (``NameError``, ``SyntaxError``, ``MemoryError``, ...),
    ``timeout``, ``cpu_limit``, ``output_limit``, ``blocked:network``, ``blocked:process``,
    ``signal:SIGSEGV``; empty when passed. ``stdout`` and ``stderr`` are tails (``truncated`` says
    whether bytes were dropped from the front).
    """

    status: Status
    kind: str
    seconds: float
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Isolation:
    """How programs are isolated on this machine (:func:`detect_isolation`).

    ``prefix`` is the command before the interpreter; ``{uid}`` in it is replaced by the worker
    slot's user id (``uid_base + slot``) when ``uid_base`` is set.
    """

    prefix: tuple[str, ...]
    python: str
    uid_base: int | None
    description: str

    def command(self, slot: int) -> list[str]:
        uid = "" if self.uid_base is None else str(self.uid_base + slot)
        return [p.replace("{uid}", uid) for p in self.prefix] + [self.python, "-I", "-B", "-c", BOOTSTRAP]

    @property
    def namespaces(self) -> bool:
        return bool(self.prefix)


def _works(cmd: list[str]) -> bool:
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=_environment(tempfile.gettempdir()), timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@lru_cache(maxsize=None)
def detect_isolation(python: str | None = None, uid_base: int = SANDBOX_UID_BASE) -> Isolation:
    """The strongest isolation that works here (module docstring), probed once per interpreter.

    ``python``: the interpreter for programs. Default: as a separate user, the system's
    ``/usr/bin/python3`` when it exists (a clean standard library, readable by any user; MBPP needs
    nothing else), else this one; otherwise this one.
    """
    if python is not None and not os.path.exists(python):
        raise ConfigError(f"sandbox python {python} does not exist; give an interpreter's path")
    own = [python] if python else [sys.executable]
    separate = [python] if python else [c for c in (SYSTEM_PYTHON, sys.executable) if os.path.exists(c)]
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    probe = ["-I", "-B", "-c", "import socket, resource"]
    namespaces = ("--net", "--pid", "--fork", "--kill-child")
    if unshare and setpriv and os.geteuid() == 0:
        prefix = (unshare, *namespaces, "--", setpriv, "--reuid={uid}", "--regid={uid}", "--clear-groups", "--")
        for py in separate:
            if _works([p.replace("{uid}", str(uid_base)) for p in prefix] + [py, *probe]):
                return Isolation(prefix, py, uid_base,
                                 f"network and PID namespaces, user ids {uid_base}+slot with RLIMIT_NPROC, "
                                 f"rlimits, guards ({py})")
    if unshare:
        prefix = (unshare, "--user", "--map-root-user", *namespaces, "--")
        for py in own:
            if _works([*prefix, py, *probe]):
                return Isolation(prefix, py, None,
                                 f"user, network and PID namespaces (no separate user: RLIMIT_NPROC not set), "
                                 f"rlimits, guards ({py})")
    return Isolation((), own[0], None,
                     f"no namespaces available: rlimits, socket and process guards, process-group kill ({own[0]})")


def _environment(home: str) -> dict[str, str]:
    """The program's whole environment: nothing inherited."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _tail(f, limit: int) -> tuple[str, int]:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - limit))
    return f.read(limit).decode("utf-8", errors="replace"), size


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")


def classify_failure(returncode: int, stderr: str) -> tuple[Status, str]:
    """``(status, kind)`` of a program that exited with ``returncode`` and wrote ``stderr``."""
    if returncode == 0:
        return "passed", ""
    if returncode < 0 or 128 < returncode < 128 + 65:
        signum = -returncode if returncode < 0 else returncode - 128
        if signum == signal.SIGXCPU:
            return "timeout", "cpu_limit"
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return "error", f"signal:{name}"
    for line in reversed(stderr.strip().splitlines()):
        m = _EXC_LINE.match(line.strip())
        if m and (m.group(1).endswith(("Error", "Exception", "Interrupt", "Exit")) or m.group(1) == "StopIteration"):
            kind, message = m.group(1).rsplit(".", 1)[-1], m.group(2) or ""
            if kind == "PermissionError" and BLOCKED in message:
                return "error", "blocked:network" if message.startswith("network") else "blocked:process"
            if kind == "AssertionError":
                return "failed", kind
            return "error", kind
    return "error", f"exit:{returncode}"


def run_program(
    source: str, limits: SandboxLimits | None = None, isolation: Isolation | None = None, slot: int = 0
) -> SandboxResult:
    """Run ``source`` (a whole program: solution, setup, asserts) in the sandbox and say how it ended.

    ``slot`` picks the user id (``uid_base + slot``) so that concurrent programs do not share a
    process limit; :func:`run_programs` gives each worker its own.
    """
    limits = limits or SandboxLimits()
    iso = isolation or detect_isolation()
    work = tempfile.mkdtemp(prefix="fedmoe-sandbox-")
    try:
        program = os.path.join(work, "solution.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        os.chmod(program, 0o644)
        if iso.uid_base is not None:
            os.chown(work, iso.uid_base + slot, iso.uid_base + slot)
        settings = {"cwd": work, "program": program, "rlimits": limits.rlimits(nproc=iso.uid_base is not None)}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            proc = subprocess.Popen(
                [*iso.command(slot), json.dumps(settings)], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=work, env=_environment(work), start_new_session=True, close_fds=True,
            )
            expired, finished = threading.Event(), threading.Event()

            def expire() -> None:
                expired.set()
                _stop(proc.pid, iso.namespaces, finished)

            timer = threading.Timer(limits.timeout_s, expire)
            timer.start()
            try:
                returncode = proc.wait()  # a blocking waitpid: Popen.wait(timeout) polls, up to 50 ms late
            finally:
                finished.set()
                timer.cancel()
            if not expired.is_set() and not iso.namespaces:  # a PID namespace took every leftover with it
                _kill_group(proc.pid)
            timed_out = expired.is_set()
            seconds = time.perf_counter() - start
            stdout, out_size = _tail(out, limits.output_bytes)
            stderr, err_size = _tail(err, limits.output_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    truncated = out_size > limits.output_bytes or err_size > limits.output_bytes
    if timed_out:
        status, kind = "timeout", "timeout"
    else:
        status, kind = classify_failure(returncode, stderr)
        if status != "passed" and max(out_size, err_size) >= limits.file_mb * 1024 * 1024:
            status, kind = "error", "output_limit"
    return SandboxResult(status, kind, seconds, returncode, stdout, stderr, truncated)


def _stop(pid: int, namespaces: bool, finished: threading.Event) -> None:
    """Kill a program that ran out of time. In namespaces, SIGKILL the namespace's first process
    (the child of ``unshare``): the kernel then kills and reaps everything in the PID namespace,
    and ``unshare`` reaps that process and exits. Killing ``unshare`` itself first would orphan the
    program's process to the machine's init, a zombie still counted against the sandbox user's
    RLIMIT_NPROC until init reaps it. The process group is killed when that does not end it."""
    if namespaces:
        for child in _children(pid):
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if finished.wait(1.0):
            return
    _kill_group(pid)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class SandboxPool:
    """``workers`` programs at a time (threads launching subprocesses, each worker slot its own user
    id), so that programs can be submitted while others still run (e.g. as completions are generated).

    Use as a context manager; :meth:`submit` returns a future of the :class:`SandboxResult`.
    """

    def __init__(self, limits: SandboxLimits | None = None, workers: int = 2, isolation: Isolation | None = None) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"sandbox workers must be an integer >= 1, got {workers!r}")
        self.limits = limits or SandboxLimits()
        self.isolation = isolation or detect_isolation()
        self._slots: queue.Queue[int] = queue.Queue()
        for s in range(workers):
            self._slots.put(s)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")

    def _one(self, source: str) -> SandboxResult:
        slot = self._slots.get()
        try:
            return run_program(source, self.limits, self.isolation, slot)
        finally:
            self._slots.put(slot)

    def submit(self, source: str) -> Future:
        return self._pool.submit(self._one, source)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_programs(
    sources: Sequence[str], limits: SandboxLimits | None = None, workers: int = 2, isolation: Isolation | None = None
) -> list[SandboxResult]:
    """:func:`run_program` on each source, ``workers`` at a time (:class:`SandboxPool`); results in
    the order of ``sources``."""
    with SandboxPool(limits, workers, isolation) as pool:
        futures = [pool.submit(s) for s in sources]
        return [f.result() for f in futures]
