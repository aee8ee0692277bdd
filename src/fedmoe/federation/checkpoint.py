"""Atomic checkpoints, config fingerprints and RNG states.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then renamed
over the target: after a crash there is either the old checkpoint or the new one, never half of
one. The temporary file of a write killed half-way is removed at the next write or start.
:class:`BackgroundWriter` does the same write in a thread, from a snapshot taken when it is asked.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from fedmoe.errors import CheckpointError, FedMoEError

FORMAT_VERSION = 1


TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8,}\.tmp$")
"""Names of the temporary files of :func:`atomic_write_bytes` (``.<target>.<random>.tmp``)."""


def stale_temp_files(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Temporary files left in ``folder`` by interrupted atomic writes (of ``target`` only, if given)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for child in folder.iterdir():
        match = TEMP_PATTERN.match(child.name)
        if match and (target is None or match.group("target") == target) and child.is_file():
            out.append(child)
    return sorted(out)


def remove_stale_temp_files(*folders: str | os.PathLike) -> list[Path]:
    """Delete what interrupted atomic writes left in ``folders``; returns the deleted paths."""
    removed = []
    for folder in folders:
        for path in stale_temp_files(folder):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new file beside ``path``, created with mode 0o666 so that the process umask applies
    (``tempfile.mkstemp`` would make it 0o600)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename it to ``path``.

    Temporary files of earlier, interrupted writes of the same target are removed first, so they
    never accumulate. The file gets the permissions the umask allows. An OS error (no space, no
    permission, a file in the way) is a :class:`FedMoEError` naming the path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_temp_files(path.parent, path.name):
            stale.unlink(missing_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as e:
        raise FedMoEError(f"cannot write {path}: {e.strerror or e}; check the folder's permissions and free space") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise FedMoEError(f"cannot write {path}: {e.strerror or e}; check the folder's permissions and free space") from e
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Save a checkpoint atomically."""
    atomic_write_bytes(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **payload}, f))


class BackgroundWriter:
    """Checkpoints written in a background thread, one at a time, so that the rounds go on while a
    checkpoint is serialised and fsynced (for a 22.7M-parameter model about 0.4 s a round, most of
    it waiting for the disk).

    :meth:`submit` first waits for the previous write, then deep-copies the payload in the calling
    thread: the snapshot is consistent, whatever the caller later changes in place. The thread
    writes it with :func:`save_checkpoint` (atomic, fsynced: a crash or a failed write leaves the
    previous checkpoint), then runs ``then`` (what must follow a written checkpoint). :meth:`wait`
    joins the write and raises its error, if it had one; call it before relying on the file.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.cpu_seconds = 0.0
        """CPU time the writes so far took in their thread (serialisation, copying into the page cache)."""

    @property
    def pending(self) -> bool:
        """Whether a submitted write has not been waited for."""
        return self._thread is not None

    def submit(self, path: str | os.PathLike, payload: dict[str, Any], then: Callable[[], None] | None = None) -> None:
        """Wait for the previous write (raising its error), snapshot ``payload`` and start writing it."""
        self.wait()
        snapshot = copy.deepcopy(payload)
        self._thread = threading.Thread(target=self._write, args=(Path(path), snapshot, then),
                                        name="fedmoe-checkpoint")
        self._thread.start()

    def _write(self, path: Path, payload: dict[str, Any], then: Callable[[], None] | None) -> None:
        start = time.thread_time()
        try:
            save_checkpoint(path, payload)
            if then is not None:
                then()
        except BaseException as e:  # raised in the caller's thread by wait()
            self._error = e
        finally:
            self.cpu_seconds += time.thread_time() - start

    def wait(self) -> None:
        """Block until the pending write is done; raise its error (once) if it failed. A wait
        interrupted (Ctrl-C) leaves the write pending, to be waited for again."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in nested dicts, lists and tuples (a tensor met twice counts twice)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a bad file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a fedmoe checkpoint (format {FORMAT_VERSION})")
    return ckpt


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to JSON-able leaf values."""
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(cfg, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in cfg):
            return {prefix[:-1]: [_leaf(v) for v in cfg]}
        out = {}
        for i, v in enumerate(cfg):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: _leaf(cfg)}


def _leaf(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def fingerprint(flat: dict[str, Any]) -> str:
    """A stable hash of flattened config values."""
    blob = json.dumps(flat, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def select_keys(flat: dict[str, Any], include: Iterable[str], exclude: Iterable[str]) -> dict[str, Any]:
    """Keys under one of the ``include`` prefixes and under none of the ``exclude`` prefixes."""
    def under(key: str, prefixes: Iterable[str]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    include, exclude = list(include), list(exclude)
    return {k: v for k, v in flat.items() if under(k, include) and not under(k, exclude)}


def diff_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ (or exist on one side only)."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k, "<unset>") != current.get(k, "<unset>"))


def capture_rng() -> dict[str, Any]:
    """Every RNG state a run draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
