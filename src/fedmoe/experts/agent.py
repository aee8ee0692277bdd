"""The inference agent: route each prompt to its experts and generate with them (DESIGN.md §4).

An expert ``e`` is two PEFT adapters (its LoRA ``e``, delta s B A, and its frozen correction
``e__corr``, delta U V), but PEFT's mixed batch (``adapter_names``, one adapter per row) takes one
adapter per row. So each expert is served by one *serving adapter* ``e__serve`` of rank r + k with
scaling 1 whose factors are the concatenations

    B' = [s B, U],   A' = [A; V]   =>   B' A' = s B A + U V

exactly the expert's delta (zero-padded where layers or versions have lower rank). Serving
adapters are rewritten when the expert's version changes (read from the coordinator's snapshot),
never trained, and leave the expert's own adapters untouched.

Combine modes (``combine``):

- ``batch``: every (prompt, routed expert) pair is one row, and all rows of all prompts are
  generated in ONE ``generate`` call (one forward per token for the whole batch, each row its own
  expert's serving adapter). A prompt routed to several experts gets one answer part per expert
  (the reference simulation stitched the experts' parts the same way).
- ``merge``: one row per prompt; a multi-expert route is served by a merged adapter, the exact
  weighted sum of the experts' deltas sum_e w_e B'_e A'_e as one concatenated adapter
  [w_1 B'_1, w_2 B'_2, ...] [A'_1; A'_2; ...] (what PEFT's ``add_weighted_adapter(combination_type=
  "cat")`` computes, weights folded into B here; PEFT's returns silently without refreshing when
  the name exists, so the agent writes the factors itself). Single-expert routes use the serving
  adapter. Merged adapters are cached per (experts, weights) and refreshed with the versions.
- ``gate``: delegate generation to a per-token gate (:class:`TokenGate`): after loading the routed
  experts' current snapshots into the model, the agent calls ``gate.generate(input_ids=...,
  attention_mask=..., **generate_kwargs)`` on the left-padded batch, one row per prompt.

Dispatch of a batch whose rows use different adapters (``dispatch``):

- ``gathered`` (default): :func:`fedmoe.models.mixed_lora.gathered_adapters`, each row's adapter
  factors stacked once per ``generate`` call and applied in every LoRA layer as two batched matmuls
  (Punica/S-LoRA's BGMV), whatever the number of adapters;
- ``peft``: PEFT's ``adapter_names`` (one adapter per row), which loops over the batch's adapters in
  every layer: about six small ops per adapter per layer per token, slower on a CPU (the
  ``mixed_batch.py`` section of benchmarks/README.md).

A batch whose rows all use one adapter activates it alone instead (no per-row dispatch).

Reading experts. With a coordinator, each routed expert is read through
:meth:`~fedmoe.experts.coordinator.ExpertCoordinator.snapshot` (``copy=False``): its per-expert
lock is held only to take references to the immutable tensors, so training pushes of other
experts never wait on inference, and a push of the same expert waits for those few microseconds
only; generation itself holds no coordinator lock. Without a coordinator the model's own expert
adapters are served: re-read from their PEFT modules on every call (the modules of each expert's
layers are looked up once) and written into the serving adapters. The agent mutates its model's PEFT modules (it adds
serving adapters): give it a model no worker trains concurrently, e.g.
:func:`fedmoe.experts.workers.replicate` of the training model (shares the frozen base).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from fedmoe.errors import ConfigError, DataError
from fedmoe.experts.routers import Route, Router
from fedmoe.models.causal import correction_name
from fedmoe.models.mixed_lora import gathered_adapters

COMBINES = ("batch", "merge", "gate")
DISPATCHES = ("gathered", "peft")
SERVE_SUFFIX = "__serve"
MERGE_PREFIX = "merged"

#: The reference simulation's three sample tasks (seeds/000, its inference phase): pure Python,
#: Python + SQL, Python + docs.
SEED_TASKS: tuple[tuple[str, str], ...] = (
    ("pure Python", "Write a python function to sort a list"),
    ("Python + SQL", "Write a python script to query the 'users' database"),
    ("Python + docs", "How do I use the new python function 'calculate_metrics'?"),
)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class TokenGate(Protocol):
    """What the ``gate`` combine mode needs: generation with the per-token gate over the experts'
    PEFT adapters of the agent's model, like transformers' ``generate`` (returns prompt + new
    tokens, rows left-padded as given)."""

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs: Any) -> torch.Tensor:
        ...


@dataclass
class Part:
    """One generation for a prompt: the experts that served it (one, several merged, or the gate),
    their route weights and versions (None: read from the model, no coordinator), the PEFT
    adapter used, and the new tokens (cut at the first end-of-sequence) and their text."""

    experts: tuple[str, ...]
    weights: tuple[float, ...]
    versions: tuple[int | None, ...]
    adapter: str
    tokens: list[int]
    text: str

    def served(self) -> str:
        who = " + ".join(f"{e} v{v}" if v is not None else e for e, v in zip(self.experts, self.versions))
        return who if self.adapter != "gate" else f"gate over {who}"


@dataclass
class Answer:
    """A prompt, its route and the generated parts (one per expert in ``batch`` mode)."""

    prompt: str
    route: Route
    parts: list[Part]

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.parts)

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(e for p in self.parts for e in p.experts)


def serving_factors(layers: Sequence, adapter: Mapping[str, torch.Tensor], correction: Mapping) -> Factors:
    """Per layer name, (B', A') = ([s B, U], [A; V]) in fp32: B' A' = s B A + U V."""
    out: Factors = {}
    for x in layers:
        a, b = adapter[x.a_key].float(), adapter[x.b_key].float()
        if x.name in correction:
            u, v = correction[x.name]
            b2, a2 = torch.cat([b * x.scaling, u.float()], dim=1), torch.cat([a, v.float()], dim=0)
        else:
            b2, a2 = b * x.scaling, a
        out[x.name] = (b2, a2)
    return out


def merged_factors(parts: Sequence[tuple[float, Factors]]) -> Factors:
    """sum_e w_e B'_e A'_e as one adapter: ([w_1 B'_1, w_2 B'_2, ...], [A'_1; A'_2; ...])."""
    names = list(dict.fromkeys(n for _, f in parts for n in f))
    out: Factors = {}
    for n in names:
        bs = [w * f[n][0] for w, f in parts if n in f]
        as_ = [f[n][1] for _, f in parts if n in f]
        out[n] = (torch.cat(bs, dim=1), torch.cat(as_, dim=0))
    return out


class InferenceAgent:
    """Routes prompts to experts and generates (module docstring).

    Args:
        model: the :class:`~fedmoe.models.causal.ExpertModel` serving the experts.
        tokenizer: its tokenizer (prompts use its chat template when it has one, else the plain
            instruction format of :func:`fedmoe.data.instructions.plain_prompt`).
        router: a :class:`~fedmoe.experts.routers.Router`; every expert it can choose must be one
            of the model's.
        coordinator: read the experts' current versions from it (None: the model's adapters).
        combine: ``batch``, ``merge`` or ``gate``.
        gate: the per-token gate (:class:`TokenGate`), required by ``combine="gate"``.
        max_new_tokens: default number of generated tokens.
        max_merges: merged adapters kept (least recently used ones are deleted).
        dispatch: how a batch mixing adapters is served: ``gathered`` (row-gathered batched
            matmuls, :mod:`fedmoe.models.mixed_lora`) or ``peft`` (PEFT's ``adapter_names``).
    """

    def __init__(
        self,
        model,
        tokenizer,
        router: Router,
        coordinator=None,
        combine: str = "batch",
        gate: TokenGate | None = None,
        max_new_tokens: int = 32,
        max_merges: int = 8,
        dispatch: str = "gathered",
    ) -> None:
        if combine not in COMBINES:
            raise ConfigError(f"agent combine mode {combine!r} is unknown; use one of {', '.join(COMBINES)}")
        if dispatch not in DISPATCHES:
            raise ConfigError(f"agent dispatch {dispatch!r} is unknown; use one of {', '.join(DISPATCHES)}")
        if combine == "gate" and not callable(getattr(gate, "generate", None)):
            raise ConfigError("agent combine mode 'gate' needs a gate object with a generate(input_ids, attention_mask, ...) method")
        unknown = [e for e in router.experts if e not in model.experts]
        if unknown:
            raise DataError(
                f"router expert {unknown[0]!r} is not an expert of the model; model experts: {', '.join(model.experts)}"
            )
        if int(max_new_tokens) < 1 or int(max_merges) < 1:
            raise ConfigError("agent max_new_tokens and max_merges must be positive integers")
        self.model, self.tokenizer, self.router = model, tokenizer, router
        self.coordinator, self.combine, self.gate, self.dispatch = coordinator, combine, gate, dispatch
        self.max_new_tokens, self.max_merges = int(max_new_tokens), int(max_merges)
        self._lock = threading.Lock()
        self._ranks: dict[str, int] = {}
        self._served: dict[str, int | None] = {}
        self._factors: dict[str, tuple[int | None, Factors]] = {}
        self._merges: OrderedDict[tuple, tuple[str, tuple]] = OrderedDict()
        self._loaded: dict[str, int] = {}
        self._modules: dict[str, list[tuple[str, torch.nn.Module]]] = {}
        self._next_merge = 0

    # -- reading experts ------------------------------------------------------------------------

    def read(self, expert: str) -> tuple[int | None, Factors]:
        """The expert's version (None without a coordinator) and serving factors
        (:func:`serving_factors`), computed once per version."""
        if self.coordinator is not None:
            snap = self.coordinator.snapshot(expert, copy=False)
            cached = self._factors.get(expert)
            if cached is not None and cached[0] == snap.version:
                return cached
            result = (snap.version, serving_factors(snap.layers, snap.adapter, snap.correction))
            self._factors[expert] = result
            return result
        return None, self._model_factors(expert)

    def _model_factors(self, expert: str) -> Factors:
        """The serving factors of the model's own adapters ``expert`` and its correction, read from
        their PEFT modules (what :func:`serving_factors` gives from the expert's state and
        correction, without collecting them through the model's state dict)."""
        modules = self._modules.get(expert)
        if modules is None:
            peft = self.model.peft
            modules = [(x.name, peft.get_submodule(x.name)) for x in self.model.adapted_layers(expert)]
            self._modules[expert] = modules
        corr = correction_name(expert)
        out: Factors = {}
        with torch.no_grad():
            for name, m in modules:
                a, b = m.lora_A[expert].weight.float(), m.lora_B[expert].weight.float() * m.scaling[expert]
                if corr in m.lora_A:
                    a = torch.cat([a, m.lora_A[corr].weight.float()])
                    u = m.lora_B[corr].weight.float()
                    b = torch.cat([b, u if m.scaling[corr] == 1 else u * m.scaling[corr]], dim=1)
                out[name] = (b, a)
        return out

    def _install(self, name: str, factors: Factors) -> None:
        """Write ``factors`` into adapter ``name`` (created, or re-created larger, as needed)."""
        need = max(b.shape[1] for b, _ in factors.values())
        peft = self.model.peft
        if name not in self._ranks or self._ranks[name] < need:
            if name in peft.peft_config:
                peft.delete_adapter(name)
            base_cfg = peft.peft_config[self.model.experts[0]]
            cfg = replace(base_cfg, r=need, lora_alpha=need, lora_dropout=0.0, use_rslora=False, rank_pattern={},
                          alpha_pattern={}, inference_mode=True)
            peft.add_adapter(name, cfg)
            self.model.activate(self.model.active)  # adding re-enables gradients of active adapters
            self._ranks[name] = need
        with torch.no_grad():
            for layer, (b, a) in factors.items():
                module = peft.get_submodule(layer)
                wa, wb = module.lora_A[name].weight, module.lora_B[name].weight
                if wa.shape == a.shape:
                    wa.copy_(a)
                    wb.copy_(b)
                else:
                    wa.zero_()
                    wb.zero_()
                    wa[: a.shape[0]] = a.to(wa.dtype)
                    wb[:, : b.shape[1]] = b.to(wb.dtype)
                module.scaling[name] = 1.0

    def serve(self, experts: Sequence[str]) -> dict[str, tuple[str, int | None, Factors]]:
        """Bring the serving adapters of ``experts`` up to date; per expert (adapter name, version,
        serving factors)."""
        out = {}
        for e in dict.fromkeys(experts):
            version, factors = self.read(e)
            name = e + SERVE_SUFFIX
            if version is None or self._served.get(e, -1) != version:
                self._install(name, factors)
                self._served[e] = version
            out[e] = (name, version, factors)
        return out

    def adapters(self, routes: Sequence[Route]) -> list[str]:
        """The PEFT adapter serving each route, installed now: the expert's serving adapter for a
        one-expert route, the exact weighted merge (:meth:`merged`) for a multi-expert one."""
        served = self.serve([e for r in routes for e in r.experts])
        return [served[r.top][0] if len(r) == 1 else self.merged(r.pairs, served) for r in routes]

    def merged(self, pairs: Sequence[tuple[str, float]], served: Mapping) -> str:
        """The adapter of the weighted merge of ``pairs`` ((expert, weight), experts in ``served``,
        as :meth:`serve` returns them): installed, or reused while its experts' versions hold."""
        key = tuple((e, round(w, 6)) for e, w in pairs)
        versions = tuple(served[e][1] for e, _ in pairs)
        hit = self._merges.get(key)
        if hit is not None and None not in versions and hit[1] == versions:
            self._merges.move_to_end(key)
            return hit[0]
        name = hit[0] if hit is not None else f"{MERGE_PREFIX}{self._next_merge}"
        if hit is None:
            self._next_merge += 1
        factors = merged_factors([(w, served[e][2]) for e, w in pairs])
        self._install(name, factors)
        self._merges[key] = (name, versions)
        self._merges.move_to_end(key)
        return name

    def _evict(self) -> None:
        """Delete the least recently used merged adapters beyond ``max_merges`` (after a generation,
        so none of the batch's is deleted before it is used)."""
        while len(self._merges) > self.max_merges:
            _, (old, _) = self._merges.popitem(last=False)
            self.model.peft.delete_adapter(old)
            self._ranks.pop(old, None)

    # -- generation -----------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids: the chat template's user turn and generation prompt, or the plain format."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        from fedmoe.data.instructions import Instruction, plain_prompt

        return list(tok(plain_prompt(Instruction(prompt, "", "", "prompt", "prompt:0")))["input_ids"])

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _batch(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self._pad_id()
        device = next(self.model.peft.parameters()).device
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        return ids, mask

    def _cut(self, new: torch.Tensor) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        stops = {eos} if eos is not None else set()
        out = []
        for row in new.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(row[:cut])
        return out

    def _generate(self, rows: Sequence[list[int]], adapter_names: Sequence[str] | None, **kwargs: Any) -> list[list[int]]:
        ids, mask = self._batch(rows)
        settings = dict(max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self._pad_id(),
                        temperature=None, top_p=None, top_k=None, use_cache=True)
        settings.update(kwargs)
        self.model.eval()
        with torch.no_grad():
            if adapter_names is None:
                out = self.gate.generate(input_ids=ids, attention_mask=mask, **settings)
            elif len(set(adapter_names)) == 1:  # one adapter for every row: no per-row dispatch hooks
                with self._only(adapter_names[0]):
                    out = self.model.peft.generate(input_ids=ids, attention_mask=mask, **settings)
            elif self.dispatch == "gathered":
                with gathered_adapters(self.model.peft, list(adapter_names)):
                    out = self.model.peft.generate(input_ids=ids, attention_mask=mask, **settings)
            else:
                out = self.model.peft.generate(input_ids=ids, attention_mask=mask, adapter_names=list(adapter_names),
                                               **settings)
        return self._cut(out[:, ids.shape[1]:])

    @contextmanager
    def _only(self, name: str) -> Iterator[None]:
        """Adapter ``name`` alone active for the block; the model's active adapters and every
        parameter's ``requires_grad`` are restored after it (training may share the model)."""
        peft = self.model.peft
        before = list(peft.base_model.active_adapters)
        grads = [(p, p.requires_grad) for p in peft.parameters()]
        peft.base_model.set_adapter([name])
        try:
            yield
        finally:
            peft.base_model.set_adapter(before)
            for p, g in grads:
                p.requires_grad_(g)

    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None, **generate_kwargs: Any) -> list[Answer]:
        """Route ``prompts`` and generate greedily (``generate_kwargs`` go to ``generate``, e.g.
        ``min_new_tokens``); one :class:`Answer` per prompt."""
        prompts = list(prompts)
        if not prompts:
            return []
        routes = self.router.route(prompts)
        for r in routes:
            for e in r.experts:
                if e not in self.model.experts:
                    raise DataError(f"route names expert {e!r}, which the model lacks; model experts: {', '.join(self.model.experts)}")
        if max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = int(max_new_tokens)
        encoded = [self.encode(p) for p in prompts]
        with self._lock:
            if self.combine == "gate":
                return self._gate(prompts, routes, encoded, generate_kwargs)
            served = self.serve([e for r in routes for e in r.experts])
            jobs: list[tuple[int, tuple[str, ...], tuple[float, ...], str]] = []
            for i, r in enumerate(routes):
                if self.combine == "batch" or len(r) == 1:
                    jobs += [(i, (e,), (w,), served[e][0]) for e, w in r]
                else:
                    jobs.append((i, r.experts, r.weights, self.merged(r.pairs, served)))
            tokens = self._generate([encoded[i] for i, *_ in jobs], [j[3] for j in jobs], **generate_kwargs)
            self._evict()
        answers = [Answer(p, r, []) for p, r in zip(prompts, routes)]
        for (i, experts, weights, adapter), toks in zip(jobs, tokens):
            versions = tuple(served[e][1] for e in experts)
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            answers[i].parts.append(Part(experts, weights, versions, adapter, toks, text))
        return answers

    def _gate(self, prompts, routes, encoded, generate_kwargs) -> list[Answer]:
        versions: dict[str, int | None] = {}
        for e in dict.fromkeys(x for r in routes for x in r.experts):
            if self.coordinator is None:
                versions[e] = None
                continue
            snap = self.coordinator.snapshot(e, copy=False)
            if self._loaded.get(e) != snap.version:
                self.model.load_expert(e, snap.adapter, snap.correction)
                self._loaded[e] = snap.version
            versions[e] = snap.version
        tokens = self._generate(encoded, None, **generate_kwargs)
        return [
            Answer(p, r, [Part(r.experts, r.weights, tuple(versions[e] for e in r.experts), "gate", t,
                               self.tokenizer.decode(t, skip_special_tokens=True))])
            for p, r, t in zip(prompts, routes, tokens)
        ]


def run_sample_tasks(
    agent: InferenceAgent,
    tasks: Sequence[tuple[str, str]] = SEED_TASKS,
    max_new_tokens: int | None = None,
    out: Callable[[str], None] | None = print,
) -> list[Answer]:
    """Generate the reference simulation's sample tasks (``(label, prompt)`` pairs) in one call and
    print, per task, the route, the experts (and versions) that served it and the text; returns
    the answers. ``out=None`` prints nothing."""
    answers = agent.generate([p for _, p in tasks], max_new_tokens)
    if out is not None:
        for (label, prompt), ans in zip(tasks, answers):
            route = ", ".join(f"{e} {w:.2f}" for e, w in ans.route)
            out(f"  [{label}] {prompt}")
            out(f"    route: {route} ({ans.route.reason}); combine: {agent.combine}")
            for part in ans.parts:
                out(f"    served by {part.served()}: {part.text.strip()!r}")
    return answers
