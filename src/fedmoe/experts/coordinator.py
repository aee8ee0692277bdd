"""The expert coordinator: versioned LoRA experts on one shared frozen base, updated exactly.

Each expert is a PEFT adapter (A = ``lora_A`` r x d_in, B = ``lora_B`` d_out x r, scaling s per
layer) plus frozen correction factors per layer, U (d_out x k) and V (k x d_in):

    effective delta W = U V + s B A        (``nn.Linear`` layout)

The base model is shared by every expert, so an expert's exact-aggregation residual can never be
folded into it; it goes into the expert's correction instead. Workers train B and A against the
correction of the version they pulled, so a worker's model is x = C_tau + s B' A'.

Modes (one per coordinator), with x the effective delta of the current version t:

- ``fedasync``: x <- (1 - w) x_t + w x_new, w = mix * s(t - tau): the adapter is mixed factor by
  factor, the correction becomes (1 - w) C_t + w C_tau plus the residual s w (1 - w)(B - B')(A - A')
  (:func:`~fedmoe.algorithms.asynchronous.fedasync_lora`);
- ``fedbuff``: ``buffer_size`` updates are buffered, then x <- x_t + eta_g / K sum_i s(t - tau_i)
  (x_i - x_{tau_i}) (:func:`~fedmoe.algorithms.asynchronous.fedbuff_lora`);
- ``sync``: ``round_size`` updates make a round, aggregated with a rule of the LoRA suite (FedEx by
  default: FedIT means plus the residual sum p_i B_i A_i - B_bar A_bar as factors; FedIT, FFA and
  HetLoRA change the adapter only; FLoRA moves the stacked sum into the correction and restarts the
  adapter); the corrections of the updates' base versions are averaged with the same weights.

Corrections are sums of immutable low-rank blocks with coefficients; versions share blocks, so the
``history`` versions kept for stale updates cost only their new blocks. When a layer's rank exceeds
``rank_budget + rank_slack`` the correction is re-compressed to ``rank_budget`` by truncated SVD of
its QR-reduced factors (never a dense d_out x d_in matrix), and the dropped energy is reported (0
while within budget).

Every update is checked (known expert, keys, shapes, dtype, finite values, a base version still in
the history); a bad one is refused with a logged reason and counted, never dropped:
applied + pending + refused == pushed. One lock per expert: reads and updates of one expert never
wait on another's. With a ``root`` folder every accepted update is persisted (fsynced) before it is
acknowledged (:class:`~fedmoe.experts.store.ExpertStore`), and a coordinator opened on the same
folder resumes each expert from its snapshot and the log after it, recomputing the same state.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal, Mapping, Sequence

import torch

from fedmoe.algorithms.asynchronous import Factors, Staleness, compress_batched, fedasync_lora, fedbuff_lora, mixing_weight
from fedmoe.algorithms.fusion import all_finite
from fedmoe.algorithms.lora.common import acc_dtype, normalise, residual_factors
from fedmoe.algorithms.lora.fedit import fedit_aggregate
from fedmoe.algorithms.lora.ffa import ffa_aggregate
from fedmoe.algorithms.lora.flora import fresh_lora_a
from fedmoe.algorithms.lora.hetlora import hetlora_aggregate
from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.errors import CheckpointError, ConfigError, FedMoEError
from fedmoe.experts.store import ExpertStore

log = logging.getLogger("fedmoe.experts")

StateDict = dict[str, torch.Tensor]
Mode = Literal["sync", "fedasync", "fedbuff"]
MODES = ("sync", "fedasync", "fedbuff")
SYNC_RULES = ("fedex", "fedit", "ffa", "hetlora", "flora")
RANK_FLEXIBLE = ("hetlora", "flora")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


# -- corrections ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Block:
    """Immutable low-rank factors per layer name, (U, V) with U V in ``nn.Linear`` layout."""

    id: int
    factors: Factors


@dataclass(frozen=True)
class Correction:
    """C = sum_j c_j U_j V_j over blocks (per layer); blocks are shared between versions."""

    terms: tuple[tuple[float, Block], ...] = ()

    @staticmethod
    def combine(parts: Sequence[tuple[float, "Correction"]]) -> "Correction":
        """sum_i a_i C_i, merging the coefficients of blocks the C_i share (no rank growth)."""
        coef: dict[int, float] = {}
        blocks: dict[int, Block] = {}
        for a, corr in parts:
            for c, block in corr.terms:
                coef[block.id] = coef.get(block.id, 0.0) + float(a) * c
                blocks[block.id] = block
        return Correction(tuple((coef[i], blocks[i]) for i in sorted(coef) if coef[i] != 0.0))

    def plus(self, block: Block) -> "Correction":
        return Correction(self.terms + ((1.0, block),))

    def rank(self, layer: str) -> int:
        return sum(int(b.factors[layer][0].shape[1]) for _, b in self.terms if layer in b.factors)

    def factors(self, layer: str, d_out: int, d_in: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with U V = C for one layer (coefficients folded into U); rank 0 gives empty factors."""
        us = [b.factors[layer][0] * c if c != 1.0 else b.factors[layer][0] for c, b in self.terms if layer in b.factors]
        vs = [b.factors[layer][1] for c, b in self.terms if layer in b.factors]
        if not us:
            return torch.zeros(d_out, 0, dtype=dtype), torch.zeros(0, d_in, dtype=dtype)
        return torch.cat(us, dim=1), torch.cat(vs, dim=0)


def compress_correction(
    corr: Correction, layers: Sequence[LoRALayer], dims: Mapping[str, tuple[int, int]], budget: int, block_id: int,
    dtype: torch.dtype,
) -> tuple[Correction, dict[str, tuple[float, float]]]:
    """The correction as one block, each layer above ``budget`` cut to its best rank-``budget``
    approximation (layers of equal shape and rank in one batched QR/SVD). Returns per cut layer
    (energy, dropped energy)."""
    factors: Factors = {}
    report: dict[str, tuple[float, float]] = {}
    groups: dict[tuple, list[str]] = {}
    for layer in layers:
        n = layer.name
        if corr.rank(n) <= budget:
            factors[n] = corr.factors(n, *dims[n], dtype)
        else:
            ranks = tuple(int(b.factors[n][0].shape[1]) if n in b.factors else 0 for _, b in corr.terms)
            groups.setdefault((dims[n], ranks), []).append(n)
    for (_, ranks), names in groups.items():
        # stack the equally shaped layers block by block: a few large ops instead of many per layer
        us, vs = [], []
        for (c, b), k in zip(corr.terms, ranks):
            if k:
                u = torch.stack([b.factors[n][0] for n in names])
                us.append(u if c == 1.0 else u * c)
                vs.append(torch.stack([b.factors[n][1] for n in names]))
        u2, v2, energy, dropped = compress_batched(torch.cat(us, dim=2).to(dtype), torch.cat(vs, dim=1).to(dtype), budget)
        for i, n in enumerate(names):
            factors[n] = (u2[i], v2[i])
            report[n] = (float(energy[i]), float(dropped[i]))
    return Correction(((1.0, Block(block_id, factors)),)), report


# -- records ----------------------------------------------------------------------------------------


@dataclass
class Update:
    """What a worker pushes: its trained adapter (same keys as the expert), the version it started
    from, its id and its sample count (the sync rules' weights)."""

    expert: str
    worker: str
    base_version: int
    weights: Mapping[str, torch.Tensor]
    num_samples: int = 1


@dataclass(frozen=True)
class Receipt:
    """The coordinator's answer to a push.

    ``status``: ``applied`` (the expert's version now includes it), ``pending`` (persisted, waiting
    for its sync round or FedBuff buffer) or ``refused`` (``reason`` says why). ``seq`` numbers the
    expert's accepted records (strictly increasing), ``version`` is the expert's version after it.
    """

    expert: str
    worker: str
    status: Literal["applied", "pending", "refused"]
    seq: int | None = None
    version: int | None = None
    base_version: int | None = None
    staleness: int | None = None
    reason: str | None = None


@dataclass
class ExpertSnapshot:
    """A consistent copy of one expert: adapter, correction factors per layer, version."""

    name: str
    version: int
    adapter: StateDict
    correction: Factors
    layers: list[LoRALayer]

    def delta(self, layer: str) -> torch.Tensor:
        """The layer's effective delta U V + s B A (dense d_out x d_in; for tests and evaluation)."""
        rec = next(x for x in self.layers if x.name == layer)
        u, v = self.correction[layer]
        b, a = self.adapter[rec.b_key], self.adapter[rec.a_key]
        dt = acc_dtype(b)
        return u.to(dt) @ v.to(dt) + rec.scaling * (b.to(dt) @ a.to(dt))


@dataclass
class ExpertMetrics:
    """Per-expert counters: staleness histogram, applied and refused per worker, bytes moved,
    energy dropped by compression."""

    applied: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    staleness: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    bytes_persisted: int = 0
    compressions: int = 0
    energy_dropped: float = 0.0

    def to_dict(self) -> dict:
        return {
            "applied": dict(self.applied), "refused": dict(self.refused), "reasons": dict(self.reasons),
            "staleness": {str(k): v for k, v in sorted(self.staleness.items())},
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "bytes_persisted": self.bytes_persisted,
            "compressions": self.compressions, "energy_dropped": self.energy_dropped,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "ExpertMetrics":
        m = cls(**{k: d[k] for k in ("bytes_in", "bytes_out", "bytes_persisted", "compressions", "energy_dropped")})
        m.applied.update(d["applied"])
        m.refused.update(d["refused"])
        m.reasons.update(d["reasons"])
        m.staleness.update({int(k): v for k, v in d["staleness"].items()})
        return m


class _Refusal(Exception):
    pass


class _Expert:
    """One expert's mutable state; every access holds ``lock``."""

    def __init__(self, name: str, layers: list[LoRALayer], adapter: StateDict) -> None:
        self.lock = threading.Lock()
        self.name = name
        self.layers = layers
        self.spec = {k: (tuple(t.shape), t.dtype) for k, t in adapter.items()}
        self.dims = {x.name: (adapter[x.b_key].shape[0], adapter[x.a_key].shape[1]) for x in layers}
        self.dtype = acc_dtype(adapter[layers[0].b_key])
        self.adapter = adapter
        self.version = 0
        self.seq = 0
        self.snapshot_seq = 0
        self.corrections: dict[int, Correction] = {0: Correction()}
        self.adapters: dict[int, StateDict] = {0: adapter}
        self.pending: list[tuple[int, Update]] = []
        self.next_block = 1
        self.metrics = ExpertMetrics()
        self.energy_by_layer: dict[str, float] = {}
        self.cache: tuple[int, Factors] = (-1, {})


@dataclass
class _Change:
    adapter: StateDict
    version: int
    correction: Correction | None
    pending: list[tuple[int, Update]]
    next_block: int
    applied: list[Update]
    cut: dict[str, tuple[float, float]] = field(default_factory=dict)


# -- the coordinator --------------------------------------------------------------------------------


class ExpertCoordinator:
    """Versioned LoRA experts updated by workers in ``sync``, ``fedasync`` or ``fedbuff`` mode.

    Args:
        root: folder of the durable store (None: in memory only). Experts found there are resumed.
        mode: ``sync``, ``fedasync`` or ``fedbuff``.
        rule: sync aggregation rule (``fedex``, ``fedit``, ``ffa``, ``hetlora``, ``flora``).
        staleness: a :class:`Staleness` or a preset name (``constant``, ``polynomial``, ``hinge``,
            ``reference`` = 1 / (1 + 0.1 d)).
        mix: FedAsync's mixing rate (w = mix * s(d)).
        buffer_size: FedBuff's K.
        server_lr: FedBuff's eta_g.
        round_size: updates per sync round (:meth:`flush` closes a partial one).
        round_sizes: per-expert overrides of ``round_size`` (e.g. one update per worker of the expert).
        rank_budget: rank of each layer's correction after compression.
        rank_slack: compress only when a layer's rank exceeds ``rank_budget + rank_slack``
            (fewer SVDs; the stored rank stays below budget + slack).
        history: versions kept per expert to reconcile stale updates (older base versions are refused).
        snapshot_every: accepted records between snapshots of an expert (the log is cut there).
        fsync: fsync each record (off: a killed process loses nothing, a power cut may).
        seed: FLoRA's seed for the fresh ``lora_A`` of each round.
    """

    def __init__(
        self,
        root: str | None = None,
        mode: Mode = "fedasync",
        rule: str = "fedex",
        staleness: Staleness | str = "polynomial",
        mix: float = 0.6,
        buffer_size: int = 4,
        server_lr: float = 1.0,
        round_size: int = 2,
        round_sizes: Mapping[str, int] | None = None,
        rank_budget: int = 32,
        rank_slack: int = 0,
        history: int = 32,
        snapshot_every: int = 100,
        fsync: bool = True,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"coordinator mode {mode!r} is unknown; use one of {', '.join(MODES)}")
        if rule not in SYNC_RULES:
            raise ConfigError(
                f"coordinator rule {rule!r} cannot aggregate an expert; use one of {', '.join(SYNC_RULES)} "
                "(fedsa keeps B on the workers, the VeRA rules have no lora_A/lora_B)"
            )
        self.staleness = Staleness.preset(staleness) if isinstance(staleness, str) else staleness
        for key, value, low in (
            ("buffer_size", buffer_size, 1), ("round_size", round_size, 1), ("rank_budget", rank_budget, 0),
            ("rank_slack", rank_slack, 0), ("history", history, 1), ("snapshot_every", snapshot_every, 1),
        ):
            if int(value) != value or value < low:
                raise ConfigError(f"coordinator {key} must be an integer >= {low}, got {value!r}")
        round_sizes = dict(round_sizes or {})
        for name, value in round_sizes.items():
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ConfigError(f"coordinator round_sizes[{name!r}] must be an integer >= 1, got {value!r}")
        self.round_sizes = {str(k): int(v) for k, v in sorted(round_sizes.items())}
        if not 0.0 <= float(mix) <= 1.0:
            raise ConfigError(f"coordinator mix must be in [0, 1], got {mix!r}")
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ConfigError(f"coordinator server_lr must be a finite number > 0, got {server_lr!r}")
        self.mode, self.rule, self.mix = mode, rule, float(mix)
        self.buffer_size, self.server_lr, self.round_size = int(buffer_size), float(server_lr), int(round_size)
        self.rank_budget, self.rank_slack, self.history = int(rank_budget), int(rank_slack), int(history)
        self.snapshot_every, self.seed = int(snapshot_every), int(seed)
        self.store = ExpertStore(root, fsync=fsync) if root is not None else None
        self._experts: dict[str, _Expert] = {}
        self._registry = threading.Lock()
        self._counts = threading.Lock()
        self.pushed = self.applied = self.refused = 0
        self.unknown_refused: Counter = Counter()
        if self.store is not None:
            for name in self.store.names():
                self._resume(name)

    def config(self) -> dict:
        """The settings that change an expert's state (a resumed store must match them)."""
        return {
            "mode": self.mode, "rule": self.rule, "staleness": self.staleness.to_dict(), "mix": self.mix,
            "buffer_size": self.buffer_size, "server_lr": self.server_lr, "round_size": self.round_size,
            **({"round_sizes": self.round_sizes} if self.round_sizes else {}),
            "rank_budget": self.rank_budget, "rank_slack": self.rank_slack, "history": self.history,
            "seed": self.seed,
        }

    # -- experts ------------------------------------------------------------------------------------

    def register(self, name: str, adapter: Mapping[str, torch.Tensor], layers: Sequence[LoRALayer]) -> int:
        """Add an expert at version 0 (persisted at once); an expert already present (resumed) with
        the same keys and shapes is kept as it is. Returns its version."""
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"expert name {name!r} must be letters, digits, '_', '.' or '-' (it names a folder)")
        layers = list(layers)
        if not layers or not all(isinstance(x, LoRALayer) for x in layers):
            raise ConfigError(f"expert {name!r}: give its LoRALayer records (one per adapted layer)")
        state = {k: t.detach().clone() for k, t in adapter.items()}
        for layer in layers:
            for key in (layer.a_key, layer.b_key):
                if key not in state:
                    raise ConfigError(f"expert {name!r}: the adapter has no {key!r} (layer {layer.name!r})")
            a, b = state[layer.a_key], state[layer.b_key]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ConfigError(
                    f"expert {name!r}: layer {layer.name!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                    "expected A (r, d_in) and B (d_out, r)"
                )
        bad = [k for k, t in state.items() if not t.is_floating_point()]
        if bad:
            raise ConfigError(f"expert {name!r}: adapter tensor {bad[0]!r} is not floating point")
        if not all_finite(state):
            raise ConfigError(f"expert {name!r}: the adapter holds NaN or infinite values")
        with self._registry:
            if name in self._experts:
                e = self._experts[name]
                spec = {k: (tuple(t.shape), t.dtype) for k, t in state.items()}
                if spec != e.spec:
                    raise ConfigError(
                        f"expert {name!r} is already registered (or resumed) with other adapter keys or shapes; "
                        "use another name or another store folder"
                    )
                return e.version
            e = _Expert(name, layers, state)
            if self.store is not None:
                e.metrics.bytes_persisted += self.store.write_snapshot(name, 0, *self._snapshot_payload(e))
            self._experts[name] = e
        return 0

    def experts(self) -> list[str]:
        return sorted(self._experts)

    def version(self, name: str) -> int:
        e = self._expert(name)
        with e.lock:
            return e.version

    def snapshot(self, name: str, copy: bool = True) -> ExpertSnapshot:
        """The expert's adapter, correction factors and version, read under its lock only. Stored
        tensors are never changed in place, so ``copy=False`` (no clone) is still consistent, as long
        as the caller does not write into them."""
        e = self._expert(name)
        with e.lock:
            if e.cache[0] != e.version:
                corr = e.corrections[e.version]
                e.cache = (e.version, {x.name: corr.factors(x.name, *e.dims[x.name], e.dtype) for x in e.layers})
            factors = e.cache[1]
            if copy:
                factors = {n: (u.clone(), v.clone()) for n, (u, v) in factors.items()}
            adapter = {k: (t.clone() if copy else t) for k, t in e.adapter.items()}
            version = e.version
            e.metrics.bytes_out += sum(t.numel() * t.element_size() for t in adapter.values()) + sum(
                u.numel() * u.element_size() + v.numel() * v.element_size() for u, v in factors.values()
            )
            return ExpertSnapshot(name, version, adapter, factors, list(e.layers))

    def metrics(self, name: str) -> dict:
        """Version, record count, pending updates, correction rank per layer and the counters of
        :class:`ExpertMetrics`, as plain data."""
        e = self._expert(name)
        with e.lock:
            corr = e.corrections[e.version]
            return {
                "version": e.version, "seq": e.seq, "pending": len(e.pending),
                "rank": {x.name: corr.rank(x.name) for x in e.layers},
                "energy_dropped_by_layer": dict(e.energy_by_layer),
                **e.metrics.to_dict(),
            }

    def counts(self) -> dict[str, int]:
        """pushed == applied + pending + refused over all experts."""
        pending = 0
        for e in list(self._experts.values()):
            with e.lock:
                pending += len(e.pending)
        with self._counts:
            return {"pushed": self.pushed, "applied": self.applied, "pending": pending, "refused": self.refused}

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    # -- updates ------------------------------------------------------------------------------------

    def push(self, update: Update) -> Receipt:
        """Check, apply (or buffer) and persist one update; the receipt comes after it is durable."""
        with self._counts:
            self.pushed += 1
        e = self._experts.get(update.expert)
        if e is None:
            return self._refuse(
                None, update, f"unknown expert {update.expert!r} (known: {', '.join(self.experts()) or 'none'})"
            )
        try:
            weights, flats, shapes = self._check(e, update)
        except _Refusal as r:
            return self._refuse(e, update, str(r))
        upd = Update(e.name, str(update.worker), int(update.base_version), weights, int(update.num_samples))
        with e.lock:
            if upd.base_version > e.version or upd.base_version not in e.corrections or (
                self.mode == "fedbuff" and upd.base_version not in e.adapters
            ):
                oldest = min(e.corrections)
                return self._refuse(
                    e, upd, f"base version {upd.base_version} cannot be reconciled: expert {e.name!r} is at "
                    f"version {e.version} and keeps versions {oldest}..{e.version} (pull it again)", locked=True,
                )
            staleness = e.version - upd.base_version
            seq = e.seq + 1
            change = self._transition(e, upd)
            if self.store is not None:
                record = {
                    "kind": "update", "seq": seq, "version": change.version, "worker": upd.worker,
                    "base_version": upd.base_version, "num_samples": upd.num_samples, "mode": self.mode,
                }
                if shapes:
                    record["shapes"] = shapes
                try:
                    e.metrics.bytes_persisted += self.store.append(e.name, record, flats)
                except FedMoEError as err:
                    return self._refuse(e, upd, f"not persisted: {err}", locked=True)
            self._commit(e, change, seq, upd)
            self._maybe_snapshot(e)
            status = "applied" if change.applied else "pending"
            return Receipt(e.name, upd.worker, status, seq, e.version, upd.base_version, staleness)

    def flush(self, name: str) -> Receipt | None:
        """Apply a partial sync round or FedBuff buffer now (None when nothing is pending)."""
        e = self._expert(name)
        with e.lock:
            if not e.pending:
                return None
            seq = e.seq + 1
            change = self._transition(e, None)
            if self.store is not None:
                record = {"kind": "flush", "seq": seq, "version": change.version, "mode": self.mode}
                e.metrics.bytes_persisted += self.store.append(e.name, record)
            self._commit(e, change, seq, None)
            self._maybe_snapshot(e)
            return Receipt(e.name, "", "applied", seq, e.version)

    # -- internals ----------------------------------------------------------------------------------

    def _expert(self, name: str) -> _Expert:
        e = self._experts.get(name)
        if e is None:
            raise ConfigError(f"unknown expert {name!r}; registered: {', '.join(self.experts()) or 'none'}")
        return e

    def _check(self, e: _Expert, update: Update) -> tuple[StateDict, StateDict, dict]:
        """The update's tensors as the coordinator's own copies (views into one flat buffer per
        dtype), the flat buffers, and the shapes that differ from the expert's (rank-flexible
        rules); or a refusal naming what is wrong."""
        if not isinstance(update.base_version, int) or isinstance(update.base_version, bool):
            raise _Refusal(f"base_version must be an integer, got {update.base_version!r}")
        if not isinstance(update.num_samples, int) or update.num_samples < 1:
            raise _Refusal(f"num_samples must be a positive integer, got {update.num_samples!r}")
        if not isinstance(update.weights, Mapping):
            raise _Refusal(f"weights must be a mapping of tensor names to tensors, got {type(update.weights).__name__}")
        missing = sorted(set(e.spec) - set(update.weights))
        if missing:
            raise _Refusal(f"the update lacks {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        extra = sorted(set(update.weights) - set(e.spec))
        if extra:
            raise _Refusal(f"the update has the unexpected key {extra[0]!r} (not in expert {e.name!r}'s adapter)")
        flexible = self.mode == "sync" and self.rule in RANK_FLEXIBLE
        ranks = {x.a_key: x for x in e.layers} | {x.b_key: x for x in e.layers}
        shapes: dict[str, tuple[int, ...]] = {}
        for key, (shape, dtype) in e.spec.items():
            t = update.weights[key]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise _Refusal(f"{key!r} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            if tuple(t.shape) != shape:
                layer = ranks.get(key)
                ok = flexible and layer is not None and t.dim() == 2 and (
                    (key == layer.a_key and t.shape[1] == shape[1] and 1 <= t.shape[0] <= shape[0])
                    or (key == layer.b_key and t.shape[0] == shape[0] and 1 <= t.shape[1] <= shape[1])
                )
                if not ok:
                    raise _Refusal(f"{key!r} has shape {tuple(t.shape)}, expected {shape}")
            shapes[key] = tuple(t.shape)
        if flexible:
            for x in e.layers:
                if shapes[x.a_key][0] != shapes[x.b_key][1]:
                    raise _Refusal(f"layer {x.name!r}: A has rank {shapes[x.a_key][0]} but B {shapes[x.b_key][1]}")
        out, flats = _flatten(e.spec, shapes, update.weights)
        for flat in flats.values():
            if not bool(torch.isfinite(flat.sum(dtype=torch.float64))):
                bad = next(k for k, t in out.items() if not bool(torch.isfinite(t).all()))
                raise _Refusal(f"{bad!r} holds NaN or infinite values")
        if self.mode == "sync" and self.rule == "ffa":
            for x in e.layers:
                if not torch.equal(out[x.a_key], e.adapter[x.a_key]):
                    raise _Refusal(f"{x.a_key!r} changed, but FFA-LoRA keeps lora_A frozen")
        changed = {k: list(v) for k, v in shapes.items() if v != e.spec[k][0]}
        return out, flats, changed

    def _refuse(self, e: _Expert | None, update: Update, reason: str, locked: bool = False) -> Receipt:
        worker = str(update.worker)
        log.warning("refused an update of expert %r from worker %r: %s", update.expert, worker, reason)
        with self._counts:
            self.refused += 1
            if e is None:
                self.unknown_refused[worker] += 1
        if e is not None:
            if not locked:
                e.lock.acquire()
            try:
                e.metrics.refused[worker] += 1
                e.metrics.reasons[reason.split(":")[0][:60]] += 1
                if self.store is not None:
                    rec = {"kind": "refused", "worker": worker, "reason": reason}
                    try:
                        e.metrics.bytes_persisted += self.store.append(e.name, rec)
                    except FedMoEError as err:
                        log.warning("refusal of worker %r not logged: %s", worker, err)
            finally:
                if not locked:
                    e.lock.release()
        return Receipt(update.expert, worker, "refused", base_version=_as_int(update.base_version), reason=reason)

    def _transition(self, e: _Expert, upd: Update | None) -> _Change:
        """The expert's next state after accepting ``upd`` (None: flush what is pending); pure."""
        pending = list(e.pending) + ([(0, upd)] if upd is not None else [])
        next_block = e.next_block
        if self.mode == "fedasync":
            d = e.version - upd.base_version
            w = mixing_weight(self.mix, self.staleness, d)
            adapter, factors = fedasync_lora(e.adapter, upd.weights, w, e.layers)
            corr = Correction.combine([(1.0 - w, e.corrections[e.version]), (w, e.corrections[upd.base_version])])
            if 0.0 < w < 1.0:
                corr, next_block = corr.plus(Block(next_block, factors)), next_block + 1
            return self._finish(e, adapter, corr, [], next_block, [upd])
        size = self.round_sizes.get(e.name, self.round_size) if self.mode == "sync" else self.buffer_size
        if upd is not None and len(pending) < size:
            return _Change(e.adapter, e.version, None, pending, next_block, [])
        updates = [u for _, u in pending]
        if self.mode == "fedbuff":
            weights = [self.staleness(e.version - u.base_version) for u in updates]
            pairs = [(u.weights, e.adapters[u.base_version]) for u in updates]
            adapter, factors = fedbuff_lora(e.adapter, pairs, weights, e.layers, self.server_lr)
            corr = e.corrections[e.version].plus(Block(next_block, factors))
            return self._finish(e, adapter, corr, [], next_block + 1, updates)
        adapter, factors, p = self._round(e, updates)
        corr = Correction.combine([(pi, e.corrections[u.base_version]) for pi, u in zip(p, updates)])
        if factors:
            corr, next_block = corr.plus(Block(next_block, factors)), next_block + 1
        return self._finish(e, adapter, corr, [], next_block, updates)

    def _round(self, e: _Expert, updates: list[Update]) -> tuple[StateDict, Factors, list[float]]:
        """One sync round with the configured rule: (adapter, correction block or {}, weights p_i)."""
        states = [u.weights for u in updates]
        n = [u.num_samples for u in updates]
        p = normalise(n)
        ids = [u.worker for u in updates]
        factors: Factors = {}
        if self.rule == "fedex":
            new, _ = fedit_aggregate(e.adapter, states, n, e.layers, ids, "fedex")
            for x in e.layers:
                u, v = residual_factors([s[x.b_key] for s in states], [s[x.a_key] for s in states], p, new[x.a_key])
                if u.shape[1]:
                    factors[x.name] = (u * x.scaling, v)
        elif self.rule == "fedit":
            new, _ = fedit_aggregate(e.adapter, states, n, e.layers, ids, "fedit")
        elif self.rule == "ffa":
            new, _ = ffa_aggregate(e.adapter, states, n, e.layers, ids, "ffa")
        elif self.rule == "hetlora":
            new, _ = hetlora_aggregate(e.adapter, states, n, e.layers, ids, rule="hetlora")
        else:  # flora: the stacked exact sum moves into the correction; the adapter restarts
            adapters = {k for x in e.layers for k in (x.a_key, x.b_key)}
            new = fedit_aggregate(
                {k: t for k, t in e.adapter.items() if k not in adapters},
                [{k: t for k, t in s.items() if k not in adapters} for s in states], n, [], ids, "flora",
            )[0] if len(adapters) < len(e.adapter) else {}
            for x in e.layers:
                dt = acc_dtype(e.adapter[x.b_key])
                b_st = torch.cat([s[x.b_key].to(dt) for s in states], dim=1)
                a_st = torch.cat([s[x.a_key].to(dt) * (pi * x.scaling) for s, pi in zip(states, p)], dim=0)
                factors[x.name] = (b_st, a_st)
                new[x.b_key] = torch.zeros_like(e.adapter[x.b_key])
            new.update(fresh_lora_a(e.layers, e.adapter, self.seed, e.version + 1))
        return new, factors, p

    def _finish(
        self, e: _Expert, adapter: StateDict, corr: Correction, pending: list, next_block: int, applied: list[Update]
    ) -> _Change:
        cut: dict[str, tuple[float, float]] = {}
        if max(corr.rank(x.name) for x in e.layers) > self.rank_budget + self.rank_slack:
            corr, cut = compress_correction(corr, e.layers, e.dims, self.rank_budget, next_block, e.dtype)
            next_block += 1
        return _Change(adapter, e.version + 1, corr, pending, next_block, applied, cut)

    def _commit(self, e: _Expert, change: _Change, seq: int, upd: Update | None, count: bool = True) -> None:
        """Make ``change`` the expert's state (``count``: add to this run's totals; not on replay)."""
        e.seq = seq
        if upd is not None:
            e.metrics.staleness[e.version - upd.base_version] += 1
            e.metrics.bytes_in += sum(t.numel() * t.element_size() for t in upd.weights.values())
        e.pending = change.pending
        e.next_block = change.next_block
        if change.correction is not None:
            e.adapter = change.adapter
            e.version = change.version
            e.corrections[e.version] = change.correction
            if self.mode == "fedbuff":
                e.adapters[e.version] = change.adapter
            oldest = e.version - self.history + 1
            for store in (e.corrections, e.adapters):
                for v in [v for v in store if v < oldest]:
                    del store[v]
            if self.mode != "fedbuff":
                e.adapters = {e.version: e.adapter}
        for u in change.applied:
            e.metrics.applied[u.worker] += 1
        if change.cut:
            e.metrics.compressions += 1
            for name, (_, dropped) in change.cut.items():
                e.metrics.energy_dropped += dropped
                e.energy_by_layer[name] = e.energy_by_layer.get(name, 0.0) + dropped
        if count:
            with self._counts:
                self.applied += len(change.applied)

    # -- persistence --------------------------------------------------------------------------------

    def _maybe_snapshot(self, e: _Expert) -> None:
        if self.store is not None and e.seq - e.snapshot_seq >= self.snapshot_every:
            e.metrics.bytes_persisted += self.store.write_snapshot(e.name, e.seq, *self._snapshot_payload(e))
            e.snapshot_seq = e.seq

    def _snapshot_payload(self, e: _Expert) -> tuple[StateDict, dict]:
        tensors: StateDict = {f"adapter/{k}": t for k, t in e.adapter.items()}
        blocks: dict[int, Block] = {}
        for corr in e.corrections.values():
            for _, b in corr.terms:
                blocks[b.id] = b
        for b in blocks.values():
            for layer, (u, v) in b.factors.items():
                tensors[f"block/{b.id}/{layer}/u"] = u
                tensors[f"block/{b.id}/{layer}/v"] = v
        if self.mode == "fedbuff":
            for ver, st in e.adapters.items():
                tensors.update({f"hist/{ver}/{k}": t for k, t in st.items()})
        for i, (_, u) in enumerate(e.pending):
            tensors.update({f"pending/{i}/{k}": t for k, t in u.weights.items()})
        meta = {
            "name": e.name, "version": e.version, "next_block": e.next_block, "config": self.config(),
            "layers": [asdict(x) for x in e.layers],
            "spec": {k: [list(s), str(d).removeprefix("torch.")] for k, (s, d) in e.spec.items()},
            "blocks": {str(b.id): sorted(b.factors) for b in blocks.values()},
            "corrections": {str(v): [[c, b.id] for c, b in corr.terms] for v, corr in e.corrections.items()},
            "adapters": sorted(e.adapters),
            "pending": [{"worker": u.worker, "base_version": u.base_version, "num_samples": u.num_samples} for _, u in e.pending],
            "metrics": e.metrics.to_dict(), "energy_by_layer": e.energy_by_layer,
        }
        return tensors, meta

    def _resume(self, name: str) -> None:
        loaded = self.store.load(name)
        meta, t = loaded.meta, loaded.tensors
        diff = sorted(k for k in set(meta["config"]) | set(self.config()) if meta["config"].get(k) != self.config().get(k))
        if diff:
            old = meta["config"]
            raise CheckpointError(
                f"expert store {self.store.folder(name)} was written with other settings ({', '.join(diff)} differ: "
                f"{', '.join(f'{k}={old.get(k)!r}' for k in diff)}); use those settings or another folder"
            )
        layers = [LoRALayer(**x) for x in meta["layers"]]
        adapter = {k: t[f"adapter/{k}"] for k in meta["spec"]}  # the registered key order (flat buffers follow it)
        e = _Expert(name, layers, adapter)
        e.version, e.seq, e.snapshot_seq, e.next_block = meta["version"], loaded.seq, loaded.seq, meta["next_block"]
        blocks = {
            int(i): Block(int(i), {n: (t[f"block/{i}/{n}/u"], t[f"block/{i}/{n}/v"]) for n in names})
            for i, names in meta["blocks"].items()
        }
        e.corrections = {int(v): Correction(tuple((c, blocks[i]) for c, i in terms)) for v, terms in meta["corrections"].items()}
        if self.mode == "fedbuff":
            e.adapters = {int(v): {k: t[f"hist/{v}/{k}"] for k in adapter} for v in meta["adapters"]}
        else:
            e.adapters = {e.version: e.adapter}
        e.pending = [
            (0, Update(name, p["worker"], p["base_version"], {k: t[f"pending/{i}/{k}"] for k in adapter}, p["num_samples"]))
            for i, p in enumerate(meta["pending"])
        ]
        e.metrics = ExpertMetrics.from_dict(meta["metrics"])
        e.energy_by_layer = dict(meta["energy_by_layer"])
        for rec, tensors in loaded.records:
            if rec["kind"] == "refused":
                e.metrics.refused[rec["worker"]] += 1
                e.metrics.reasons[rec["reason"].split(":")[0][:60]] += 1
                continue
            upd = None
            if rec["kind"] == "update":
                shapes = {k: tuple(rec.get("shapes", {}).get(k, s)) for k, (s, _) in e.spec.items()}
                weights = _split(e.spec, shapes, tensors)
                upd = Update(name, rec["worker"], rec["base_version"], weights, rec["num_samples"])
            change = self._transition(e, upd)
            if change.version != rec["version"] or rec["seq"] != e.seq + 1:
                raise CheckpointError(
                    f"expert log of {name!r} in {self.store.folder(name)} does not replay (record {rec['seq']}: "
                    f"version {change.version}, logged {rec['version']}); the folder was changed by hand"
                )
            self._commit(e, change, rec["seq"], upd, count=False)
        if loaded.dropped_bytes:
            log.warning("expert %r: dropped a torn log record (%d bytes) left by an interrupted write", name, loaded.dropped_bytes)
        self._experts[name] = e
        self._maybe_snapshot(e)


def _flat_name(dtype: torch.dtype) -> str:
    return "flat." + str(dtype).removeprefix("torch.")


def _flatten(
    spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]], shapes: Mapping[str, tuple[int, ...]],
    weights: Mapping[str, torch.Tensor],
) -> tuple[StateDict, StateDict]:
    """Copies of ``weights`` (cast to the spec's dtypes) as views into one flat buffer per dtype,
    in the spec's key order: one allocation, one copy pass, one buffer to check and to persist."""
    flats: StateDict = {}
    out: StateDict = {}
    for dtype in dict.fromkeys(d for _, d in spec.values()):
        keys = [k for k, (_, d) in spec.items() if d == dtype]
        flat = torch.empty(sum(math.prod(shapes[k]) for k in keys), dtype=dtype)
        views = _views(flat, keys, shapes)
        torch._foreach_copy_(list(views.values()), [weights[k].detach() for k in keys])
        out.update(views)
        flats[_flat_name(dtype)] = flat
    return {k: out[k] for k in spec}, flats


def _views(flat: torch.Tensor, keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> StateDict:
    out: StateDict = {}
    offset = 0
    for k in keys:
        n = math.prod(shapes[k])
        out[k] = flat[offset : offset + n].view(shapes[k])
        offset += n
    return out


def _split(
    spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]], shapes: Mapping[str, tuple[int, ...]], flats: StateDict
) -> StateDict:
    """The inverse of :func:`_flatten` (log replay)."""
    out: StateDict = {}
    for dtype in dict.fromkeys(d for _, d in spec.values()):
        keys = [k for k, (_, d) in spec.items() if d == dtype]
        out.update(_views(flats[_flat_name(dtype)], keys, shapes))
    return {k: out[k] for k in spec}


def _as_int(x: object) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None
