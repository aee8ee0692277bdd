"""Prompt routers over LoRA experts: which expert (or weighted experts) serves a prompt (DESIGN.md §4).

One interface, :class:`Router`: ``route(prompts) -> list[Route]``, a :class:`Route` being an
ordered tuple of ``(expert, weight)`` pairs, heaviest first, whose weights sum to 1; ``experts``
names every expert the router can choose. :func:`build_router` makes one from config.

- :class:`KeywordRouter`: the reference simulation's regular expressions as data, a table
  ``{expert: [pattern, ...]}`` (YAML or JSON, the reference table ``fedmoe/experts/routes.yaml``, :data:`REFERENCE_TABLE`). Every expert with
  a matching pattern joins the route (a multi-expert route); weights are equal (``weighting:
  equal``, the reference's behaviour: every routed expert contributes its part) or proportional to
  the number of the expert's patterns that match (``weighting: count``); a prompt no pattern
  matches goes to the ``default`` expert.
- :class:`LearnedRouter`: a linear or one-hidden-layer classifier on the frozen base's mean-pooled
  prompt embedding (:class:`PromptEmbedder`), trained on domain-labelled prompts centrally
  (:meth:`LearnedRouter.fit`) or across workers with FedAvg of the classifier's state dict
  (:meth:`LearnedRouter.fit_federated`); routes are the top-k experts with the softmax
  probabilities renormalised over the k.

An expert name a router does not know (a label, a default, a table entry outside the allowed
experts, a checkpoint for other experts) is refused with one error line naming it and the known ones.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.errors import CheckpointError, ConfigError, DataError

Weighting = Literal["equal", "count"]
WEIGHTINGS = ("equal", "count")
#: The reference simulation's keyword rules as data (shipped with the package).
REFERENCE_TABLE = Path(__file__).with_name("routes.yaml")
TABLE_KEYS = ("experts", "default", "weighting", "case_sensitive")


# ------------------------------------------------------------------------------------ routes


@dataclass(frozen=True)
class Route:
    """Experts serving one prompt: ``pairs`` of (expert, weight), heaviest first, weights summing
    to 1; ``reason`` says why (the rules that matched, the fallback, the classifier's confidence)."""

    pairs: tuple[tuple[str, float], ...]
    reason: str = ""

    def __post_init__(self) -> None:
        if not self.pairs:
            raise DataError("a route needs at least one expert")
        total = sum(w for _, w in self.pairs)
        if not math.isclose(total, 1.0, rel_tol=1e-6, abs_tol=1e-6):
            raise DataError(f"route weights {[w for _, w in self.pairs]} sum to {total}, not 1")

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(e for e, _ in self.pairs)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(w for _, w in self.pairs)

    @property
    def top(self) -> str:
        """The heaviest expert (the first on ties)."""
        return self.pairs[0][0]

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def make_route(scores: Sequence[tuple[str, float]], reason: str = "") -> Route:
    """A route from non-negative scores: zero scores dropped, weights normalised, sorted by weight
    (stable: equal weights keep the given order)."""
    kept = [(e, float(s)) for e, s in scores if s > 0]
    if not kept:
        raise DataError("a route needs an expert with a positive score")
    total = sum(s for _, s in kept)
    ordered = sorted(kept, key=lambda p: -p[1])
    return Route(tuple((e, s / total) for e, s in ordered), reason)


def check_expert(name: str, known: Sequence[str], what: str = "router") -> str:
    """``name`` if it is one of ``known``, else a DataError naming it and the known experts."""
    if name not in known:
        raise DataError(f"{what}: expert {name!r} is unknown; known experts: {', '.join(known) or 'none'}")
    return name


class Router(ABC):
    """Chooses the experts of each prompt. Subclasses set ``experts`` (every expert they can
    return) and implement :meth:`route`."""

    experts: tuple[str, ...]

    @abstractmethod
    def route(self, prompts: Sequence[str]) -> list[Route]:
        """One route per prompt, in order."""

    def predict(self, prompts: Sequence[str]) -> list[str]:
        """The top expert of each prompt."""
        return [r.top for r in self.route(prompts)]


# ------------------------------------------------------------------------------------ keyword


def read_keyword_table(path: str | Path) -> Any:
    """The parsed document of a keyword table file (YAML for ``.yaml``/``.yml``, else JSON)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"keyword table {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"keyword table {path} does not parse: {first}") from None


class KeywordRouter(Router):
    """Regular expressions per expert (``re.search``; case-insensitive unless ``case_sensitive``).

    Args:
        table: ``{expert: [pattern, ...]}``, in the order routes list tied experts.
        default: the expert of a prompt no pattern matches.
        weighting: ``equal`` (every matching expert the same weight) or ``count`` (weight
            proportional to the number of the expert's patterns that match).
        experts: the experts that exist (e.g. the model's); a table or default naming another is
            refused. None: the table's own experts.
        source: where the table came from, for error messages.
    """

    def __init__(
        self,
        table: Mapping[str, Sequence[str]],
        default: str,
        weighting: Weighting = "equal",
        case_sensitive: bool = False,
        experts: Sequence[str] | None = None,
        source: str = "keyword table",
    ) -> None:
        if not isinstance(table, Mapping) or not table:
            raise DataError(f"{source}: 'experts' must map each expert to a list of regular expressions")
        if weighting not in WEIGHTINGS:
            raise DataError(f"{source}: weighting {weighting!r} is unknown; use one of {', '.join(WEIGHTINGS)}")
        if not isinstance(case_sensitive, bool):
            raise DataError(f"{source}: case_sensitive must be true or false, got {case_sensitive!r}")
        flags = 0 if case_sensitive else re.IGNORECASE
        known = tuple(table) if experts is None else tuple(experts)
        self.rules: dict[str, tuple[re.Pattern, ...]] = {}
        for expert, patterns in table.items():
            if not isinstance(expert, str) or not expert:
                raise DataError(f"{source}: expert names must be non-empty strings, got {expert!r}")
            check_expert(expert, known, source)
            if isinstance(patterns, str) or not isinstance(patterns, Sequence) or not patterns:
                raise DataError(f"{source}: expert {expert!r} must have a non-empty list of patterns, got {patterns!r}")
            compiled = []
            for p in patterns:
                if not isinstance(p, str) or not p:
                    raise DataError(f"{source}: expert {expert!r} has pattern {p!r}, not a non-empty string")
                try:
                    compiled.append(re.compile(p, flags))
                except re.error as e:
                    raise DataError(f"{source}: expert {expert!r} pattern {p!r} does not compile ({e}); fix the regular expression") from None
            self.rules[expert] = tuple(compiled)
        if not isinstance(default, str):
            raise DataError(f"{source}: 'default' must name the fallback expert, got {default!r}")
        self.default = check_expert(default, known, f"{source} default")
        self.weighting = weighting
        self.source = source
        self.experts = tuple(dict.fromkeys([*self.rules, self.default]))

    @classmethod
    def from_dict(cls, doc: Any, experts: Sequence[str] | None = None, source: str = "keyword table") -> "KeywordRouter":
        """From ``{experts: {name: [patterns]}, default: name, weighting: equal|count, case_sensitive: bool}``."""
        if not isinstance(doc, Mapping):
            raise DataError(f"{source}: expected a mapping with keys {', '.join(TABLE_KEYS)}, got {type(doc).__name__}")
        unknown = sorted(set(doc) - set(TABLE_KEYS))
        if unknown:
            raise DataError(f"{source}: unknown key {unknown[0]!r}; keys: {', '.join(TABLE_KEYS)}")
        for key in ("experts", "default"):
            if key not in doc:
                raise DataError(f"{source}: missing key {key!r}; keys: {', '.join(TABLE_KEYS)}")
        return cls(doc["experts"], doc["default"], doc.get("weighting", "equal"), doc.get("case_sensitive", False),
                   experts, source)

    @classmethod
    def from_file(cls, path: str | Path, experts: Sequence[str] | None = None) -> "KeywordRouter":
        """From a YAML (``.yaml``/``.yml``) or JSON file in the :meth:`from_dict` layout."""
        return cls.from_dict(read_keyword_table(path), experts, f"keyword table {path}")

    def matches(self, prompt: str) -> dict[str, list[str]]:
        """Per expert with a match, the patterns that matched ``prompt``."""
        out: dict[str, list[str]] = {}
        for expert, patterns in self.rules.items():
            hit = [p.pattern for p in patterns if p.search(prompt)]
            if hit:
                out[expert] = hit
        return out

    def route(self, prompts: Sequence[str]) -> list[Route]:
        routes = []
        for prompt in _prompts(prompts):
            hits = self.matches(prompt)
            if not hits:
                routes.append(Route(((self.default, 1.0),), "no pattern matched: default"))
                continue
            scores = [(e, 1.0 if self.weighting == "equal" else float(len(p))) for e, p in hits.items()]
            reason = "; ".join(f"{e}: {', '.join(repr(x) for x in p)}" for e, p in hits.items())
            routes.append(make_route(scores, reason))
        return routes


# ------------------------------------------------------------------------------------ learned


class PromptEmbedder:
    """The frozen base's mean-pooled last hidden state of each prompt (padding masked out).

    Args:
        model: an :class:`~fedmoe.models.causal.ExpertModel` (its base runs with every adapter
            disabled) or a transformers causal LM.
        tokenizer: the model's tokenizer; prompts are tokenised as plain text (no chat template,
            whose fixed tokens would dominate the mean).
        max_length: tokens kept per prompt.
        batch_size: prompts per forward.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 256, batch_size: int = 16) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = int(max_length), int(batch_size)

    @property
    def dim(self) -> int:
        lm = getattr(self.model, "peft", self.model)
        return int(lm.config.hidden_size)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = _prompts(prompts)
        lm = getattr(self.model, "peft", self.model)
        device = next(lm.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        was_training = lm.training
        lm.eval()
        out = []
        try:
            for i in range(0, len(prompts), self.batch_size):
                ids = [self.tokenizer(p, truncation=True, max_length=self.max_length)["input_ids"] or [pad]
                       for p in prompts[i : i + self.batch_size]]
                width = max(len(x) for x in ids)
                input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
                if hasattr(lm, "disable_adapter"):
                    with lm.disable_adapter():
                        hidden = lm(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                                    use_cache=False).hidden_states[-1]
                else:
                    hidden = lm(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                                use_cache=False).hidden_states[-1]
                m = mask.unsqueeze(-1).to(torch.float32)
                out.append(((hidden.float() * m).sum(1) / m.sum(1)).cpu())
        finally:
            lm.train(was_training)
        return torch.cat(out)


def _classifier(dim: int, classes: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(dim, classes)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, classes))


class LearnedRouter(Router):
    """A softmax classifier over experts on standardised prompt embeddings.

    Args:
        experts: the class names, in output order.
        dim: embedding size (the base's hidden size).
        hidden: 0 for a linear classifier, else the width of one hidden GELU layer.
        top_k: experts per route (weights: softmax probabilities renormalised over the k).
        embedder: turns prompts into embeddings (:class:`PromptEmbedder`); without one only
            embeddings can be routed (:meth:`route_embeddings`).
        seed: initialisation and data order.

    The input is standardised per dimension, (x - shift) / scale, with statistics of the training
    embeddings (buffers of :attr:`net`, saved with it): a causal LM's hidden states have a few huge
    dimensions that would otherwise dominate.
    """

    def __init__(
        self,
        experts: Sequence[str],
        dim: int,
        hidden: int = 0,
        top_k: int = 1,
        embedder: PromptEmbedder | None = None,
        seed: int = 0,
    ) -> None:
        names = tuple(experts)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise DataError(f"learned router: experts must be distinct non-empty names, got {list(names)}")
        for key, value, low in (("dim", dim, 1), ("hidden", hidden, 0), ("top_k", top_k, 1)):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ConfigError(f"learned router: {key} must be an integer >= {low}, got {value!r}")
        if top_k > len(names):
            raise ConfigError(f"learned router: top_k={top_k} exceeds the {len(names)} experts")
        self.experts, self.dim, self.hidden, self.top_k = names, int(dim), int(hidden), int(top_k)
        self.embedder, self.seed = embedder, int(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = _classifier(self.dim, len(names), self.hidden)
        self.net.register_buffer("shift", torch.zeros(self.dim))
        self.net.register_buffer("scale", torch.ones(self.dim))

    # -- inference ----------------------------------------------------------------------------

    def _embed(self, prompts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        if isinstance(prompts, torch.Tensor):
            x = prompts
        else:
            if self.embedder is None:
                raise ConfigError("learned router has no embedder; give one (PromptEmbedder) or route embeddings")
            x = self.embedder(prompts)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise DataError(f"learned router: embeddings of shape {tuple(x.shape)}, expected (n, {self.dim})")
        return x.float()

    @torch.no_grad()
    def probabilities(self, prompts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Softmax over experts, one row per prompt (or embedding row)."""
        self.net.eval()
        return F.softmax(self._logits(self._embed(prompts)), dim=-1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.net.shift) / self.net.scale)

    def route_embeddings(self, embeddings: torch.Tensor) -> list[Route]:
        return self._routes(self.probabilities(embeddings))

    def route(self, prompts: Sequence[str] | torch.Tensor) -> list[Route]:
        return self._routes(self.probabilities(prompts if isinstance(prompts, torch.Tensor) else _prompts(prompts)))

    def _routes(self, probs: torch.Tensor) -> list[Route]:
        top, idx = probs.topk(self.top_k, dim=-1)
        routes = []
        for p, i in zip(top.tolist(), idx.tolist()):
            total = sum(p)
            pairs = tuple((self.experts[j], q / total) for j, q in zip(i, p))
            routes.append(Route(pairs, "classifier p=" + ", ".join(f"{self.experts[j]} {q:.3f}" for j, q in zip(i, p))))
        return routes

    # -- training -----------------------------------------------------------------------------

    def _targets(self, labels: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.experts.index(check_expert(lab, self.experts, "learned router label")) for lab in labels])

    def _data(self, prompts: Sequence[str] | torch.Tensor, labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._embed(prompts)
        if len(labels) != x.shape[0]:
            raise DataError(f"learned router: {x.shape[0]} prompts but {len(labels)} labels")
        if x.shape[0] == 0:
            raise DataError("learned router: no labelled prompts to train on")
        return x, self._targets(labels)

    def set_statistics(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """The input standardisation: shift = mean, scale = sqrt(var) (at least 1e-6 of the largest)."""
        std = var.clamp_min(0).sqrt()
        with torch.no_grad():
            self.net.shift.copy_(mean)
            self.net.scale.copy_(std.clamp_min(max(float(std.max()) * 1e-6, 1e-12)))

    def _train(self, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int,
               weight_decay: float, gen: torch.Generator) -> float:
        opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        self.net.train()
        losses = []
        for _ in range(int(epochs)):
            order = torch.randperm(x.shape[0], generator=gen)
            for i in range(0, x.shape[0], batch_size):
                j = order[i : i + batch_size]
                loss = F.cross_entropy(self._logits(x[j]), y[j])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        self.net.eval()
        return sum(losses) / max(len(losses), 1)

    def fit(
        self, prompts: Sequence[str] | torch.Tensor, labels: Sequence[str], epochs: int = 50, lr: float = 1e-2,
        batch_size: int = 32, weight_decay: float = 1e-4,
    ) -> float:
        """Central training on labelled prompts (or embeddings): AdamW on the cross-entropy, the
        standardisation from these embeddings. Returns the mean loss of the last epoch's steps."""
        _check_training(epochs, lr, batch_size)
        x, y = self._data(prompts, labels)
        self.set_statistics(x.mean(0), x.var(0, unbiased=False))
        gen = torch.Generator().manual_seed(self.seed)
        return self._train(x, y, epochs, lr, batch_size, weight_decay, gen)

    def fit_federated(
        self, per_worker_data: Sequence[tuple[Sequence[str] | torch.Tensor, Sequence[str]]], rounds: int = 20,
        local_epochs: int = 1, lr: float = 1e-2, batch_size: int = 32, weight_decay: float = 1e-4,
    ) -> list[float]:
        """FedAvg across workers, each with its own labelled prompts (or embeddings).

        First the standardisation: each worker sends its count, mean and mean of squares, whose
        count-weighted average is the pooled mean and variance (exact). Then ``rounds`` rounds:
        every worker trains ``local_epochs`` from the global classifier, and the new global state
        is the sample-weighted average of theirs (:func:`fedmoe.algorithms.fusion.weighted_average`).
        Returns each round's sample-weighted mean local loss.
        """
        from fedmoe.algorithms.fusion import weighted_average

        _check_training(local_epochs, lr, batch_size)
        if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 1:
            raise ConfigError(f"learned router: rounds must be a positive integer, got {rounds!r}")
        if not per_worker_data:
            raise DataError("learned router: fit_federated needs at least one worker's data")
        data = [self._data(x, y) for x, y in per_worker_data]
        counts = [float(x.shape[0]) for x, _ in data]
        mean = weighted_average([{"m": x.mean(0)} for x, _ in data], counts)["m"]
        second = weighted_average([{"m": (x.double() ** 2).mean(0)} for x, _ in data], counts)["m"]
        self.set_statistics(mean, second - mean.double() ** 2)
        history = []
        for r in range(int(rounds)):
            start = {k: v.clone() for k, v in self.net.state_dict().items()}
            states, losses = [], []
            for w, (x, y) in enumerate(data):
                self.net.load_state_dict(start)
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + r * 1009 + w)
                losses.append(self._train(x, y, local_epochs, lr, batch_size, weight_decay, gen))
                states.append({k: v.clone() for k, v in self.net.state_dict().items()})
            self.net.load_state_dict(weighted_average(states, counts, base=start))
            history.append(sum(c * loss for c, loss in zip(counts, losses)) / sum(counts))
        self.net.eval()
        return history

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """The classifier (and its standardisation) as safetensors, with the experts and settings
        in the file's metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"experts": json.dumps(list(self.experts)), "dim": str(self.dim), "hidden": str(self.hidden),
                "top_k": str(self.top_k), "kind": "learned-router"}
        save_file({k: v.detach().contiguous() for k, v in self.net.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(
        cls, path: str | Path, experts: Sequence[str] | None = None, embedder: PromptEmbedder | None = None,
        top_k: int | None = None,
    ) -> "LearnedRouter":
        """A router saved by :meth:`save`; with ``experts``, a checkpoint for another set (or order)
        of experts is refused."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"router checkpoint {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"router checkpoint {path} does not load: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if meta.get("kind") != "learned-router":
            raise CheckpointError(f"router checkpoint {path} was not written by LearnedRouter.save")
        saved = tuple(json.loads(meta["experts"]))
        if experts is not None and tuple(experts) != saved:
            raise CheckpointError(
                f"router checkpoint {path} is for experts {list(saved)}, not {list(experts)}; "
                "train a router for these experts"
            )
        router = cls(saved, int(meta["dim"]), int(meta["hidden"]), int(top_k or meta["top_k"]), embedder)
        router.net.load_state_dict(state)
        return router


# ------------------------------------------------------------------------------------ helpers


def accuracy(router: Router, prompts: Sequence[str] | torch.Tensor, labels: Sequence[str]) -> float:
    """Share of prompts whose top expert is their label (labels must be the router's experts)."""
    if len(labels) == 0:
        raise DataError("router accuracy needs at least one labelled prompt")
    for lab in dict.fromkeys(labels):
        check_expert(lab, router.experts, "router accuracy label")
    predicted = router.predict(prompts)
    if len(predicted) != len(labels):
        raise DataError(f"router accuracy: {len(predicted)} prompts but {len(labels)} labels")
    return sum(p == lab for p, lab in zip(predicted, labels)) / len(labels)


ROUTERS = ("keyword", "learned")


def build_router(kind: str, **options: Any) -> Router:
    """A router from config.

    - ``keyword``: ``table`` (a YAML/JSON file or a mapping in :meth:`KeywordRouter.from_dict`'s
      layout), optional ``experts`` (the experts that exist).
    - ``learned``: ``checkpoint`` (a :meth:`LearnedRouter.save` file), optional ``experts``,
      ``embedder``, ``top_k``; or, for an untrained router, ``experts``, ``dim`` and optionally
      ``hidden``, ``top_k``, ``embedder``, ``seed``.
    """
    if kind == "keyword":
        _only(kind, options, {"table", "experts"}, {"table"})
        table = options["table"]
        if isinstance(table, Mapping):
            return KeywordRouter.from_dict(table, options.get("experts"))
        return KeywordRouter.from_file(table, options.get("experts"))
    if kind == "learned":
        if "checkpoint" in options:
            _only(kind, options, {"checkpoint", "experts", "embedder", "top_k"}, {"checkpoint"})
            return LearnedRouter.load(options["checkpoint"], options.get("experts"), options.get("embedder"),
                                      options.get("top_k"))
        _only(kind, options, {"experts", "dim", "hidden", "top_k", "embedder", "seed"}, {"experts", "dim"})
        return LearnedRouter(**options)
    raise ConfigError(f"router kind {kind!r} is unknown; use one of {', '.join(ROUTERS)}")


def _only(kind: str, options: Mapping[str, Any], allowed: set[str], required: set[str]) -> None:
    extra = sorted(set(options) - allowed)
    if extra:
        raise ConfigError(f"router {kind!r} has no option {extra[0]!r}; options: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(options))
    if missing:
        raise ConfigError(f"router {kind!r} needs option {missing[0]!r}")


def _prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise DataError("route a list of prompts, not one string (wrap it in a list)")
    out = list(prompts)
    for p in out:
        if not isinstance(p, str):
            raise DataError(f"prompts must be strings, got {type(p).__name__}")
    return out


def _check_training(epochs: int, lr: float, batch_size: int) -> None:
    for key, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ConfigError(f"learned router: {key} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"learned router: lr must be a finite number > 0, got {lr!r}")
