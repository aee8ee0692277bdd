"""Atomic checkpoints, config fingerprints and RNG states.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then renamed
over the target: after a crash there is either the old checkpoint or the new one, never half of
one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from fedmoe.errors import CheckpointError

FORMAT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
