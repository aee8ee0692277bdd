"""Client state between rounds: personalised weights and optimizer states, in memory or on disk.

Only clients that have been sampled are materialised: a client never sampled holds the common
initial weights, which are stored once. States are kept losslessly; ``dtype`` (fp16 or bf16)
stores floating tensors at lower precision only when asked.

Two backends:

* **memory** (``root=None``): every stored client stays in RAM and the checkpoint copies them all,
  so a checkpoint file is the whole run.
* **disk** (``root`` a folder, the run's ``clients/``): one safetensors file per client and kind,
  ``c<id>.weights.v<version>.safetensors`` and ``c<id>.optimizer.v<version>.safetensors``, read on
  demand and written atomically, so memory holds at most the clients of the running round. The
  version is the round that wrote the file. A checkpoint holds a manifest (client id -> file,
  version, bytes, sha256) instead of the tensors, so a run killed after its checkpoint and resumed
  reads exactly the versions that checkpoint saw and ignores anything written later. A file is
  deleted once neither the current state nor the latest checkpoint (:meth:`ClientStore.commit`)
  references it.

An optimizer state file holds the state's tensors; its structure (dicts with integer keys,
tuples, floats, flags) is JSON in the safetensors metadata, so nothing is unpickled on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch

from fedmoe.algorithms.fusion import is_mixable
from fedmoe.errors import CheckpointError, FedMoEError
from fedmoe.federation.checkpoint import atomic_write_bytes

StateDict = dict[str, torch.Tensor]
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
KINDS = ("weights", "optimizer")
FILE_PATTERN = re.compile(r"^c(?P<client>\d+)\.(?P<kind>weights|optimizer)\.v(?P<version>\d+)\.safetensors$")
"""Names of the disk backend's client files."""
_FORMAT = "fedmoe-client-state"
_CHUNK = 1 << 22


class ClientStore:
    """Per-client weights and optimizer states.

    Args:
        dtype: ``None`` (lossless) or ``float16`` / ``bfloat16`` for floating weight tensors.
        root: folder of the disk backend (created on the first write); ``None``: keep everything in memory.
    """

    def __init__(self, dtype: Literal["float16", "bfloat16"] | None = None, root: str | os.PathLike | None = None) -> None:
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r}")
        self.dtype = dtype
        self.root = Path(root) if root is not None else None
        self._slots: dict[str, _MemorySlots | _DiskSlots] = {
            kind: _MemorySlots() if self.root is None else _DiskSlots(self.root, kind) for kind in KINDS
        }

    @property
    def backend(self) -> Literal["memory", "disk"]:
        return "memory" if self.root is None else "disk"

    @property
    def weights(self) -> Mapping[int, StateDict]:
        """Client id -> stored weights (in the stored dtype; read from disk on access with the disk backend)."""
        return self._slots["weights"].view()

    @property
    def optimizers(self) -> Mapping[int, dict]:
        """Client id -> stored optimizer state."""
        return self._slots["optimizer"].view()

    def get_weights(self, client_id: int) -> StateDict | None:
        """The client's stored weights (floating tensors back in fp32 if stored at lower precision),
        or None if never stored."""
        w = self._slots["weights"].get(client_id)
        if w is None or self.dtype is None:
            return w
        return {k: v.float() if is_mixable(v) else v for k, v in w.items()}

    def put_weights(self, client_id: int, weights: StateDict, version: int | None = None) -> None:
        """Store the client's weights; ``version`` (the round) names the disk file (default: the
        client's last version + 1)."""
        dt = _DTYPES.get(self.dtype) if self.dtype else None
        stored = {
            k: (v.detach().to("cpu", dt) if dt is not None and is_mixable(v) else v.detach().cpu())
            for k, v in weights.items()
        }
        self._slots["weights"].put(client_id, stored, version)

    def get_optimizer(self, client_id: int) -> dict | None:
        return self._slots["optimizer"].get(client_id)

    def put_optimizer(self, client_id: int, state: dict | None, version: int | None = None) -> None:
        if state is not None:
            self._slots["optimizer"].put(client_id, _to_cpu(state), version)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the clients' tensors (memory) or the manifest of their files (disk).

        With the disk backend, clients restored from elsewhere are first written into ``root``
        (:meth:`persist`); call :meth:`commit` once the checkpoint is safely written.
        """
        if self.root is None:
            return {"backend": "memory", "dtype": self.dtype, "weights": self._slots["weights"].data,
                    "optimizers": self._slots["optimizer"].data}
        self.persist()
        return {"backend": "disk", "dtype": self.dtype, "root": str(self.root.resolve()),
                "files": {kind: self._slots[kind].manifest() for kind in KINDS}}

    def load_state_dict(self, state: dict[str, Any], folder: str | os.PathLike | None = None) -> None:
        """Restore a state saved by either backend into this one.

        A disk manifest is looked up in ``folder`` (where the checkpoint's run keeps its ``clients/``)
        if that exists, else in the folder it was saved from. Nothing is written or read here but,
        for a memory store restoring a disk manifest, the files it names.
        """
        self.dtype = state["dtype"]
        if "files" in state:
            source = Path(folder) if folder is not None and Path(folder).is_dir() else Path(state["root"])
            for kind in KINDS:
                entries = {int(c): _Entry(**e, folder=source) for c, e in state["files"][kind].items()}
                self._slots[kind].restore_files(entries)
        else:
            self._slots["weights"].restore_objects(state["weights"])
            self._slots["optimizer"].restore_objects(state["optimizers"])

    def persist(self) -> None:
        """Disk backend: write clients that live elsewhere (restored from a memory checkpoint or
        from another run's folder) into ``root``, so that the next checkpoint references only it."""
        for slots in self._slots.values():
            slots.persist()

    def commit(self) -> None:
        """The current state is what the newest checkpoint references: delete every other client file."""
        if self.root is None:
            return
        keep = {e.file for slots in self._slots.values() for e in slots.entries.values() if slots.owns(e)}
        for slots in self._slots.values():
            slots.pinned = {e.file for e in slots.entries.values() if slots.owns(e)}
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if FILE_PATTERN.match(path.name) and path.name not in keep:
                path.unlink(missing_ok=True)

    def verify(self) -> None:
        """Every file the state references exists with its recorded size and sha256, else a
        :class:`CheckpointError` naming the file."""
        for slots in self._slots.values():
            slots.verify()

    def check_writable(self) -> None:
        """Disk backend: raise a :class:`CheckpointError` if ``root`` cannot be created or written."""
        if self.root is None:
            return
        where = self.root
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
            raise CheckpointError(
                f"client store folder {self.root} is not writable ({where} is read-only, not a folder or without "
                "permission); make it writable, or set federation.client_store: memory"
            )


@dataclass(frozen=True)
class _Entry:
    """One client file: name, version (the round that wrote it), size, sha256, and the folder it is in."""

    file: str
    version: int
    bytes: int
    sha256: str
    folder: Path | None = None
    pending: Any = None
    """A state restored from a memory checkpoint, not written yet."""

    def record(self) -> dict[str, Any]:
        return {"file": self.file, "version": self.version, "bytes": self.bytes, "sha256": self.sha256}

    @property
    def path(self) -> Path:
        return self.folder / self.file


class _MemorySlots:
    """One kind of client state held in a dict."""

    def __init__(self) -> None:
        self.data: dict[int, Any] = {}

    def view(self) -> Mapping[int, Any]:
        return self.data

    def get(self, client_id: int) -> Any:
        return self.data.get(client_id)

    def put(self, client_id: int, value: Any, version: int | None) -> None:
        self.data[client_id] = value

    def restore_objects(self, data: dict[int, Any]) -> None:
        self.data = data

    def restore_files(self, entries: dict[int, _Entry]) -> None:
        self.data = {cid: _read(e) for cid, e in entries.items()}

    def persist(self) -> None:
        pass

    def verify(self) -> None:
        pass


class _DiskSlots:
    """One kind of client state as one file per client in ``root``."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root = root
        self.kind = kind
        self.entries: dict[int, _Entry] = {}
        self.pinned: set[str] = set()
        """Files of ``root`` that the newest checkpoint references (never deleted by a put)."""

    def view(self) -> Mapping[int, Any]:
        return _DiskView(self)

    def owns(self, entry: _Entry) -> bool:
        return entry.pending is None and entry.folder is not None and _same(entry.folder, self.root)

    def get(self, client_id: int) -> Any:
        entry = self.entries.get(client_id)
        if entry is None:
            return None
        return entry.pending if entry.pending is not None else _read(entry)

    def put(self, client_id: int, value: Any, version: int | None) -> None:
        old = self.entries.get(client_id)
        if version is None:
            version = old.version + 1 if old is not None else 1
        self.entries[client_id] = self._write(client_id, _encode(value, self.kind), version)
        self._drop(old)

    def _write(self, client_id: int, data: bytes, version: int) -> _Entry:
        name = f"c{client_id}.{self.kind}.v{version}.safetensors"
        if name in self.pinned:
            raise RuntimeError(f"{self.root / name} is referenced by the latest checkpoint; write a newer version")
        try:
            atomic_write_bytes(self.root / name, lambda f: f.write(data))
        except FedMoEError as e:
            raise CheckpointError(str(e)) from e.__cause__
        return _Entry(name, version, len(data), hashlib.sha256(data).hexdigest(), self.root)

    def _drop(self, old: _Entry | None) -> None:
        """Delete a replaced file unless the latest checkpoint or the new entry references it."""
        if old is None or not self.owns(old) or old.file in self.pinned:
            return
        if any(e.file == old.file and self.owns(e) for e in self.entries.values()):
            return
        (self.root / old.file).unlink(missing_ok=True)

    def manifest(self) -> dict[int, dict[str, Any]]:
        return {cid: e.record() for cid, e in sorted(self.entries.items())}

    def restore_objects(self, data: dict[int, Any]) -> None:
        self.entries = {int(cid): _Entry(f"c{cid}.{self.kind}.v0.safetensors", 0, 0, "", None, value)
                        for cid, value in data.items()}
        self.pinned = set()

    def restore_files(self, entries: dict[int, _Entry]) -> None:
        self.entries = entries
        self.pinned = {e.file for e in entries.values() if self.owns(e)}

    def persist(self) -> None:
        for cid, entry in list(self.entries.items()):
            if entry.pending is not None:
                self.entries[cid] = self._write(cid, _encode(entry.pending, self.kind), entry.version)
            elif not self.owns(entry):
                data = _read_bytes(entry)
                self.entries[cid] = self._write(cid, data, entry.version)

    def verify(self) -> None:
        for entry in self.entries.values():
            if entry.pending is not None:
                continue
            path = entry.path
            if not path.is_file():
                raise CheckpointError(
                    f"client store file {path} is missing (the checkpoint references it); restore the run's "
                    "clients/ folder, or start a new run"
                )
            size = path.stat().st_size
            if size != entry.bytes:
                raise _corrupt(path, f"{size} bytes, the checkpoint recorded {entry.bytes}")
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != entry.sha256:
                raise _corrupt(path, "its sha256 differs from the checkpoint's")


class _DiskView(Mapping):
    """Read-only mapping over the disk backend: client id -> its state, read when accessed."""

    def __init__(self, slots: _DiskSlots) -> None:
        self._slots = slots

    def __getitem__(self, client_id: int) -> Any:
        if client_id not in self._slots.entries:
            raise KeyError(client_id)
        return self._slots.get(client_id)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._slots.entries))

    def __len__(self) -> int:
        return len(self._slots.entries)


# -- the file format -------------------------------------------------------------------------------


def _encode(value: Any, kind: str) -> bytes:
    """Safetensors bytes: the tensors of ``value`` plus, in the metadata, its structure as JSON
    (a state dict's key order, or an optimizer state's nesting)."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def tensor(t: torch.Tensor) -> dict[str, str]:
        t = t.detach().cpu().contiguous()
        if t.numel():  # safetensors refuses tensors sharing memory (tied weights) or viewing part of one
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
        name = str(len(tensors))
        tensors[name] = t
        return {"tensor": name}

    def structure(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return tensor(obj)
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, dict):
            return {"dict": [[structure(k), structure(v)] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {type(obj).__name__: [structure(v) for v in obj]}
        raise TypeError(f"a client {kind} state cannot hold a {type(obj).__name__} ({obj!r}) in a safetensors file")

    meta = {"format": _FORMAT, "kind": kind, "structure": json.dumps(structure(value), allow_nan=True)}
    return safetensors.torch.save(tensors, metadata=meta)


def _decode(data: bytes) -> Any:
    (length,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + length])["__metadata__"]
    if meta.get("format") != _FORMAT:
        raise ValueError("not a fedmoe client state file")
    tensors = safetensors.torch.load(data)

    def build(obj: Any) -> Any:
        if isinstance(obj, dict):
            if "tensor" in obj:
                return tensors[obj["tensor"]]
            if "dict" in obj:
                return {_key(build(k)): build(v) for k, v in obj["dict"]}
            if "tuple" in obj:
                return tuple(build(v) for v in obj["tuple"])
            return [build(v) for v in obj["list"]]
        return obj

    return build(json.loads(meta["structure"]))


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def _read_bytes(entry: _Entry) -> bytes:
    path = entry.path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"client store file {path} is missing (the checkpoint references it); restore the run's clients/ "
            "folder, or start a new run"
        ) from None
    except OSError as e:
        raise CheckpointError(f"client store file {path} cannot be read: {e.strerror or e}") from None
    if len(data) != entry.bytes:
        raise _corrupt(path, f"{len(data)} bytes, the checkpoint recorded {entry.bytes}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise _corrupt(path, "its sha256 differs from the checkpoint's")
    return data


def _read(entry: _Entry) -> Any:
    data = _read_bytes(entry)
    try:
        return _decode(data)
    except Exception as e:  # a file whose recorded hash matches but that another program wrote
        raise _corrupt(entry.path, f"{type(e).__name__}: {e}") from None


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"client store file {path} is corrupt ({why}); restore it from a backup of the run, or start a new run"
    )


def _same(a: Path, b: Path) -> bool:
    return a == b or a.resolve() == b.resolve()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
