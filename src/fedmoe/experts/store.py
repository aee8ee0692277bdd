"""Durable storage of the expert coordinator: per expert, safetensors snapshots and an append-only log.

Layout under ``root/<expert>/``:

- ``snapshot-<seq>.safetensors``: the expert's whole state after log record ``seq`` (tensors, plus
  a JSON document in the safetensors metadata), written atomically (temporary file, fsync, rename).
- ``log-<seq>.bin`` and ``log-<seq>.jsonl``: the records after that snapshot. A record's tensors
  are appended to the ``.bin`` file as one safetensors blob and fsynced; then its JSON line
  (``offset``, ``length`` and the record's fields) is appended to the ``.jsonl`` index and fsynced.
  A record exists once its JSON line is complete, so a kill at any point leaves either the whole
  record or none of it; :meth:`ExpertStore.load` drops a torn last line and any blob bytes after the
  last indexed record.

After each snapshot a new log segment starts and older segments and snapshots are deleted, so the
disk holds one snapshot plus the records since. This class does I/O only; the coordinator decides
what a record or a snapshot holds.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedmoe.errors import CheckpointError, FedMoEError
from fedmoe.federation.checkpoint import atomic_write_bytes, remove_stale_temp_files

SNAPSHOT = re.compile(r"^snapshot-(\d{12})\.safetensors$")
META_KEY = "fedmoe_expert"


DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def pack(named: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can write (contiguous, no shared storage): a tensor that appears under
    several names is written once (``aliases`` maps each other name to the stored one); views into a
    storage already written are copied."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
    storages: set[int] = set()
    aliases: dict[str, str] = {}
    for name, t in named.items():
        t = t.detach().contiguous()
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in storages:
            t = t.clone()
            storage = t.untyped_storage().data_ptr()
        storages.add(storage)
        seen[key] = name
        out[name] = t
    return out, aliases


def write_safetensors(f: Any, tensors: Mapping[str, torch.Tensor]) -> int:
    """Write ``tensors`` (contiguous, CPU) to the open binary file ``f`` in the safetensors format,
    straight from their memory (no serialised copy). Returns the bytes written."""
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for t in tensors.values():
        if t.numel():
            f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
    return 8 + len(raw) + offset


def unpack(tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack`."""
    out = dict(tensors)
    for name, target in aliases.items():
        out[name] = out[target]
    return out


@dataclass
class _Segment:
    seq: int
    bin: Any
    index: Any
    offset: int


@dataclass
class Loaded:
    """What :meth:`ExpertStore.load` found: the snapshot and the intact records after it."""

    seq: int
    meta: dict
    tensors: dict[str, torch.Tensor]
    records: list[tuple[dict, dict[str, torch.Tensor]]] = field(default_factory=list)
    dropped_bytes: int = 0
    """Bytes of a torn record (index line or blob) removed from the log's end."""


class ExpertStore:
    """Snapshots and append-only logs of experts under ``root`` (see the module docstring).

    Calls for one expert must not overlap (the coordinator holds that expert's lock); calls for
    different experts may run concurrently. ``fsync=False`` skips the fsyncs (a killed process
    loses nothing, a power cut may).
    """

    def __init__(self, root: str | os.PathLike, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = bool(fsync)
        self._segments: dict[str, _Segment] = {}
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FedMoEError(f"cannot create the expert store {self.root}: {e.strerror or e}") from e

    def folder(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        """Experts that have a snapshot in the store."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self._snapshots(p))

    # -- writing ------------------------------------------------------------------------------------

    def write_snapshot(self, name: str, seq: int, tensors: Mapping[str, torch.Tensor], meta: dict) -> int:
        """Write the expert's snapshot after record ``seq`` atomically, start a new log segment and
        delete the older segments and snapshots. Returns the snapshot's bytes."""
        folder = self.folder(name)
        packed, aliases = pack(tensors)
        doc = json.dumps({**meta, "seq": seq, "aliases": aliases})
        blob = st_save(packed, metadata={META_KEY: doc})
        atomic_write_bytes(folder / f"snapshot-{seq:012d}.safetensors", lambda f: f.write(blob))
        self._open_segment(name, seq)
        for path in folder.iterdir():
            m = SNAPSHOT.match(path.name)
            old = (m and int(m.group(1)) < seq) or (
                path.name.startswith("log-") and path.name.split(".")[0] != f"log-{seq:012d}"
            )
            if old:
                path.unlink(missing_ok=True)
        return len(blob)

    def append(self, name: str, record: dict, tensors: Mapping[str, torch.Tensor] | None = None) -> int:
        """Append one record (its tensors, then its JSON line), durable when this returns.
        Returns the bytes written."""
        seg = self._segments.get(name)
        if seg is None:
            raise CheckpointError(f"expert {name!r} has no open log; write its snapshot first")
        line = dict(record)
        size = 0
        if tensors:
            packed, aliases = pack(tensors)
            try:
                length = write_safetensors(seg.bin, packed)
                seg.bin.flush()
                if self.fsync:
                    os.fsync(seg.bin.fileno())
            except OSError as e:
                raise FedMoEError(f"cannot append to {seg.bin.name}: {e.strerror or e}; check free space") from e
            line.update(offset=seg.offset, length=length)
            if aliases:
                line["aliases"] = aliases
            seg.offset += length
            size += length
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        try:
            seg.index.write(data)
            seg.index.flush()
            if self.fsync:
                os.fsync(seg.index.fileno())
        except OSError as e:
            raise FedMoEError(f"cannot append to {seg.index.name}: {e.strerror or e}; check free space") from e
        return size + len(data)

    def close(self) -> None:
        """Close the open log files."""
        with self._lock:
            for seg in self._segments.values():
                seg.bin.close()
                seg.index.close()
            self._segments.clear()

    def _open_segment(self, name: str, seq: int) -> None:
        folder = self.folder(name)
        with self._lock:
            old = self._segments.pop(name, None)
            if old is not None:
                old.bin.close()
                old.index.close()
            b = open(folder / f"log-{seq:012d}.bin", "ab")
            i = open(folder / f"log-{seq:012d}.jsonl", "ab")
            self._segments[name] = _Segment(seq, b, i, b.tell())

    # -- reading ------------------------------------------------------------------------------------

    @staticmethod
    def _snapshots(folder: Path) -> list[tuple[int, Path]]:
        out = []
        for p in folder.iterdir():
            m = SNAPSHOT.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def load(self, name: str) -> Loaded:
        """The newest snapshot of ``name`` and the intact records after it; a torn tail is cut off
        the files, and the log stays open for appending."""
        folder = self.folder(name)
        remove_stale_temp_files(folder)
        snaps = self._snapshots(folder)
        if not snaps:
            raise CheckpointError(f"{folder} holds no expert snapshot; register the expert instead of resuming it")
        seq, path = snaps[-1]
        try:
            raw = path.read_bytes()
            tensors = st_load(raw)
            size = int.from_bytes(raw[:8], "little")
            meta = json.loads(json.loads(raw[8 : 8 + size])["__metadata__"][META_KEY])
        except Exception as e:
            raise CheckpointError(f"expert snapshot {path} cannot be read ({type(e).__name__}: {e})") from None
        loaded = Loaded(seq, meta, unpack(tensors, meta.get("aliases", {})))
        bin_path, index_path = folder / f"log-{seq:012d}.bin", folder / f"log-{seq:012d}.jsonl"
        blob = bin_path.read_bytes() if bin_path.exists() else b""
        text = index_path.read_bytes() if index_path.exists() else b""
        good_index, good_bin = 0, 0
        for raw_line in text.splitlines(keepends=True):
            if not raw_line.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw_line)
            except ValueError:
                break
            tens: dict[str, torch.Tensor] = {}
            if "length" in rec:
                end = rec["offset"] + rec["length"]
                if end > len(blob):
                    break
                try:
                    tens = unpack(st_load(blob[rec["offset"] : end]), rec.get("aliases", {}))
                except Exception:
                    break
                good_bin = end
            loaded.records.append((rec, tens))
            good_index += len(raw_line)
        loaded.dropped_bytes = (len(text) - good_index) + (len(blob) - good_bin)
        if loaded.dropped_bytes:
            for p, size in ((index_path, good_index), (bin_path, good_bin)):
                if p.exists():
                    with open(p, "r+b") as f:
                        f.truncate(size)
                        f.flush()
                        os.fsync(f.fileno())
        with self._lock:
            old = self._segments.pop(name, None)
            if old is not None:
                old.bin.close()
                old.index.close()
            b = open(bin_path, "ab")
            i = open(index_path, "ab")
            self._segments[name] = _Segment(seq, b, i, b.tell())
        return loaded
