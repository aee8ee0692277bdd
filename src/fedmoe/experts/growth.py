"""Continual growth: a new LoRA expert for a domain unlike every existing one (DESIGN.md §4).

Each expert keeps the centroid of its domain's prompt embeddings (the frozen base's mean-pooled
hidden states, :class:`fedmoe.experts.routers.PromptEmbedder`). A batch of prompts from a domain
is novel when the cosine similarity of its mean embedding m to every centroid c_e is below a
threshold tau:

    novel  <=>  max_e cos(m, c_e) < tau

A novel domain gets a new expert (:func:`grow_expert`): a fresh LoRA adapter (PEFT's
initialisation: A Kaiming-uniform, B = 0, so the new expert starts as the base) registered with
the coordinator at version 0, its own workers (:class:`~fedmoe.experts.workers.WorkerSpec` with the
new expert as specialty), and its centroid. The existing experts are not touched.

The adapter's keys follow the existing experts' layout (a template expert's keys with the adapter
name replaced), so a model that can add an expert (``model.add_expert(name)``, creating the PEFT
adapter ``name`` and its correction ``name__corr``) serves it with the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.errors import ConfigError, DataError


class NoveltyDetector:
    """Per-expert centroids of prompt embeddings and the novelty test (module docstring).

    Args:
        threshold: tau in (-1, 1]; a domain whose best cosine similarity is below it is novel.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        if not (isinstance(threshold, (int, float)) and -1.0 < threshold <= 1.0):
            raise ConfigError(f"novelty threshold must be in (-1, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    @property
    def experts(self) -> list[str]:
        return list(self._sums)

    def add(self, expert: str, embeddings: torch.Tensor) -> None:
        """Fold ``embeddings`` (n x d) into ``expert``'s centroid (a running mean)."""
        x = _check(embeddings, self.dim if self._sums else None)
        if expert in self._sums:
            self._sums[expert] += x.sum(0)
            self._counts[expert] += x.shape[0]
        else:
            self._sums[expert] = x.sum(0)
            self._counts[expert] = x.shape[0]

    @property
    def dim(self) -> int | None:
        return next(iter(self._sums.values())).shape[0] if self._sums else None

    def centroid(self, expert: str) -> torch.Tensor:
        if expert not in self._sums:
            raise DataError(f"novelty detector: expert {expert!r} has no centroid; known: {', '.join(self._sums) or 'none'}")
        return self._sums[expert] / self._counts[expert]

    def similarities(self, embeddings: torch.Tensor) -> dict[str, float]:
        """cos(mean of ``embeddings``, centroid) per expert."""
        m = _check(embeddings, self.dim).mean(0)
        return {e: float(F.cosine_similarity(m, self.centroid(e), dim=0)) for e in self._sums}

    def nearest(self, embeddings: torch.Tensor) -> tuple[str | None, float]:
        """The most similar expert and its similarity ((None, -1) without experts)."""
        sims = self.similarities(embeddings)
        if not sims:
            return None, -1.0
        best = max(sims, key=sims.get)
        return best, sims[best]

    def is_novel(self, embeddings: torch.Tensor) -> bool:
        """Whether the domain's mean embedding is below the threshold to every centroid (novel
        when there is no expert yet)."""
        return self.nearest(embeddings)[1] < self.threshold


def _check(embeddings: torch.Tensor, dim: int | None) -> torch.Tensor:
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise DataError("novelty detector: give embeddings as a non-empty (n, d) tensor")
    if dim is not None and embeddings.shape[1] != dim:
        raise DataError(f"novelty detector: embeddings have dimension {embeddings.shape[1]}, the centroids {dim}")
    x = embeddings.detach().double()
    if not bool(torch.isfinite(x).all()):
        raise DataError("novelty detector: embeddings hold NaN or infinite values")
    return x


# ------------------------------------------------------------------------------------ growth


def adapter_keys_for(layers: Sequence[LoRALayer], template: str, name: str) -> list[LoRALayer]:
    """The layer records of adapter ``name`` on the same layers as ``template``'s (keys renamed)."""
    old_a, old_b = f".lora_A.{template}.", f".lora_B.{template}."
    out = []
    for x in layers:
        if old_a not in x.a_key or old_b not in x.b_key:
            raise DataError(f"layer {x.name!r} keys {x.a_key!r}, {x.b_key!r} are not adapter {template!r}'s")
        out.append(replace(x, a_key=x.a_key.replace(old_a, f".lora_A.{name}."),
                           b_key=x.b_key.replace(old_b, f".lora_B.{name}.")))
    return out


def fresh_adapter(
    layers: Sequence[LoRALayer], shapes: Mapping[str, Sequence[int]], seed: int = 0, dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A new LoRA adapter as PEFT initialises one: A Kaiming-uniform (a = sqrt 5), B = 0; ``shapes``
    gives each key's shape."""
    gen = torch.Generator().manual_seed(int(seed))
    state = {}
    for x in layers:
        a = torch.empty(tuple(shapes[x.a_key]), dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        state[x.a_key] = a.to(dtype)
        state[x.b_key] = torch.zeros(tuple(shapes[x.b_key]), dtype=dtype)
    return state


@dataclass(frozen=True)
class Growth:
    """A new expert: its name, its version in the coordinator, its workers, and the similarity of
    its domain to the nearest existing expert when it was created."""

    expert: str
    version: int
    workers: tuple
    nearest: str | None
    similarity: float


def grow_expert(
    coordinator, detector: NoveltyDetector, name: str, embeddings: torch.Tensor, template: str,
    workers: int | Sequence = 1, model=None, seed: int = 0, force: bool = False,
) -> Growth | None:
    """Create expert ``name`` for a novel domain; None when the domain is not novel (and not ``force``).

    Args:
        coordinator: the :class:`~fedmoe.experts.coordinator.ExpertCoordinator`; ``template``, a
            registered expert, gives the layers and shapes of the new adapter.
        detector: the centroids; the new expert's is added.
        name: the new expert (not yet registered, not a detector expert).
        embeddings: the domain's prompt embeddings (n x d).
        workers: how many workers to create (ids ``<name>-w1``, ...) or their
            :class:`~fedmoe.experts.workers.WorkerSpec` (specialty ``name``).
        model: a model with ``add_expert(name)`` and ``expert_state(name)`` /
            ``adapted_layers(name)`` (then its fresh adapter is registered); None: the adapter is
            built from the template's layout (:func:`fresh_adapter`).
        seed: the fresh adapter's initialisation.
    """
    from fedmoe.experts.workers import WorkerSpec

    if name in coordinator.experts() or name in detector.experts:
        raise DataError(f"expert {name!r} already exists; choose another name for the new domain")
    nearest, sim = detector.nearest(embeddings)
    if not force and not detector.is_novel(embeddings):
        return None
    if isinstance(workers, int):
        if workers < 1:
            raise ConfigError(f"a new expert needs at least one worker, got workers={workers}")
        specs = tuple(WorkerSpec(f"{name}-w{i + 1}", name) for i in range(workers))
    else:
        specs = tuple(workers)
        if not specs:
            raise ConfigError(f"a new expert needs at least one worker; expert {name!r} got none")
        wrong = [w.id for w in specs if w.specialty != name]
        if wrong:
            raise ConfigError(f"worker {wrong[0]!r} of new expert {name!r} has another specialty")
    if model is not None and all(hasattr(model, a) for a in ("add_expert", "expert_state", "adapted_layers")):
        model.add_expert(name)
        state, layers = model.expert_state(name), model.adapted_layers(name)
    else:
        snap = coordinator.snapshot(template, copy=False)
        layers = adapter_keys_for(snap.layers, template, name)
        shapes = {}
        for old, new in zip(snap.layers, layers):
            shapes[new.a_key] = snap.adapter[old.a_key].shape
            shapes[new.b_key] = snap.adapter[old.b_key].shape
        dtype = snap.adapter[snap.layers[0].a_key].dtype
        state = fresh_adapter(layers, shapes, seed, dtype)
    version = coordinator.register(name, state, layers)
    detector.add(name, embeddings)
    return Growth(name, version, specs, nearest, sim)
