"""A per-token mixture of LoRA experts over PEFT's LoRA layers (MixLoRA-style gate; DESIGN.md §4).

PEFT sums every active adapter (or picks one adapter per row with ``adapter_names``); it has no
trainable per-token mixture. :class:`MoELoRA` patches the forward of every adapted
``peft.tuners.lora.Linear`` of an :class:`~fedmoe.models.causal.ExpertModel` so that

    out = base(x) + sum_{e in top-k(x)} g_e(x) (s_e B_e A_e dropout(x) + U_e V_e x)

with one gate per layer on the layer input x: logits = W x + b (W: E x d_in, like
``Linear(d_in, E, bias=False)``, plus a separate per-expert bias b that lets the gate grow a column
without disturbing the old experts). The experts stay in PEFT's ModuleDicts (``lora_A[e]``,
``lora_B[e]``, ``scaling[e]``, and the frozen correction ``e__corr``), so PEFT save/load is
unchanged; the gate is saved beside them (:meth:`MoELoRA.save_gate`, safetensors with the expert
names in the metadata). :meth:`MoELoRA.remove` restores PEFT's own forward.

Routing (DyLoRA-MoE's two modes):

- ``dense``: g = softmax over all E logits (used while an expert is new, so every expert gets a
  share and a gradient);
- ``sparse``: g = softmax over the top-k logits, i.e. the softmax over all E renormalised over the
  top-k (computed from the top-k logits alone, so the other experts' logits do not even round into it);
- ``auto`` (default): dense while any expert is immature, sparse once all are mature. An expert is
  mature after ``mature_steps`` gate-training steps since it joined the gate (counted by
  :func:`train_gate` or :meth:`MoELoRA.record_steps`).

Load balancing (Switch Transformer, eq. 4): per layer, f_e = share of the tokens whose top-1
expert is e and P_e = mean gate probability of e (softmax over all E); the loss is
c E sum_e f_e P_e averaged over layers (:meth:`MoELoRA.balance_loss`, = c for uniform routing). The
statistics are those of the last forward run with gradients enabled (training); forwards under
``torch.no_grad`` (generation, evaluation) skip them.

All experts' A x (and corrections' V x) are one matmul with the factors stacked, and all B's
another, so the gate costs two skinny matmuls per layer whatever E is. Per-token gating keeps the
KV cache valid: generation with ``use_cache=True`` works unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.data.instructions import response_batches
from fedmoe.errors import CheckpointError, DataError
from fedmoe.models.causal import ExpertModel, correction_name

MODES = ("auto", "dense", "sparse")
#: Bias of a grown gate column by default: exp(-1e4) is exactly 0 in float32, so the new expert
#: takes no weight in either mode until its bias is raised (:meth:`MoELoRA.set_expert_bias`).
OFF_LOGIT = -1.0e4
FORMAT = "fedmoe.moe_lora_gate/1"


class TokenGate(nn.Module):
    """One layer's gate: logits = W x + b, W: E x d_in, b: E (the separate per-expert bias)."""

    def __init__(self, d_in: int, n_experts: int, init_std: float = 0.02, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, d_in, generator=generator) * init_std)
        self.bias = nn.Parameter(torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def grow(self, bias: float) -> None:
        """Append one expert: a zero weight row and the given bias (old rows unchanged)."""
        with torch.no_grad():
            weight = torch.cat([self.weight, self.weight.new_zeros(1, self.weight.shape[1])])
            b = torch.cat([self.bias, self.bias.new_full((1,), float(bias))])
        self.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(b, requires_grad=self.bias.requires_grad)


class _Plan:
    """Per layer, the stacked-factor layout: adapter names (LoRA rows first, then corrections), and
    for each stacked rank row its expert index and its scaling (on the factors' device)."""

    def __init__(self, module: nn.Module, experts: Sequence[str]) -> None:
        self.lora = list(experts)
        self.corr = [correction_name(e) for e in experts]
        owner, scale = [], []
        for names in (self.lora, self.corr):
            for i, name in enumerate(names):
                r = module.lora_A[name].weight.shape[0]
                owner += [i] * r
                scale += [float(module.scaling[name])] * r
        device = module.lora_A[experts[0]].weight.device
        self.rows = len(owner)
        self.owner = torch.tensor(owner, dtype=torch.long, device=device)
        self.scale = torch.tensor(scale, dtype=torch.float32, device=device)


class MoELoRA(nn.Module):
    """A per-token gate over the LoRA experts of an :class:`ExpertModel` (installed on construction).

    Args:
        model: the experts; its PEFT layers get the gated forward, its adapters are untouched.
        experts: the gated experts, in column order (default: all of ``model.experts``).
        top_k: experts per token in sparse mode (capped at E).
        mode: ``auto`` (dense while an expert is immature, else sparse), ``dense`` or ``sparse``.
        mature_steps: gate-training steps after which an expert counts as mature (``auto`` mode).
        balance_coef: c of the Switch load-balancing loss (:meth:`balance_loss`).
        init_std: the gate weights start N(0, init_std^2) (seeded by ``seed``), the biases 0.

    ``force = name`` puts all gate mass on one expert (one-hot), reproducing PEFT's single-adapter
    output for that expert; None (default) routes with the gate.
    """

    def __init__(
        self,
        model: ExpertModel,
        experts: Sequence[str] | None = None,
        top_k: int = 2,
        mode: str = "auto",
        mature_steps: int = 100,
        balance_coef: float = 0.01,
        init_std: float = 0.02,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        names = tuple(model.experts if experts is None else experts)
        if not names or len(set(names)) != len(names):
            raise DataError(f"a gate needs distinct expert names, got {list(names)}")
        for name in names:
            model._known(name)
        if int(top_k) < 1:
            raise DataError(f"top_k={top_k} must be a positive integer")
        if int(mature_steps) < 0:
            raise DataError(f"mature_steps={mature_steps} must be >= 0")
        self.experts = names
        self.top_k = int(top_k)
        self.mode = mode
        self.mature_steps = int(mature_steps)
        self.balance_coef = float(balance_coef)
        self.steps = {name: 0 for name in names}
        self._force: int | None = None
        self.layer_names = tuple(layer.name for layer in model.adapted_layers(names[0]))
        modules = [model.peft.get_submodule(name) for name in self.layer_names]
        for name in names:
            self._check_adapters(name, modules)
        gen = torch.Generator().manual_seed(seed)
        self.gates = nn.ModuleList(
            TokenGate(m.in_features, len(names), init_std, gen).to(m.lora_A[names[0]].weight.device) for m in modules
        )
        self._plans = [_Plan(m, names) for m in modules]
        self._stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._token_mask: torch.Tensor | None = None
        self._hook = None
        self._joint: bool | None = None
        self.install()

    # ----------------------------------------------------------------------- install / remove

    def _gated_layers(self) -> list[nn.Module]:
        return [self.model.peft.get_submodule(name) for name in self.layer_names]

    def _check_adapters(self, expert: str, modules: Sequence[nn.Module]) -> None:
        for layer, module in zip(self.layer_names, modules):
            for adapter in (expert, correction_name(expert)):
                if adapter not in module.lora_A:
                    raise DataError(
                        f"expert {expert!r} has no adapter {adapter!r} at {layer}; add the expert to the "
                        "ExpertModel first"
                    )
                if adapter in getattr(module, "lora_variant", {}):
                    raise DataError(f"adapter {adapter!r} at {layer} is a LoRA variant (DoRA, ...); the gate mixes plain LoRA only")

    @property
    def installed(self) -> bool:
        return self._hook is not None

    def install(self) -> None:
        """Patch every adapted layer's forward with the gated mixture (idempotent)."""
        if self.installed:
            return
        modules = self._gated_layers()
        for layer, module in zip(self.layer_names, modules):
            if "forward" in vars(module):
                raise DataError(f"layer {layer} already has a patched forward (another gate?); remove() that gate first")
        for i, module in enumerate(modules):
            module.forward = _gated_forward(self, i, module)
        self._hook = self.model.peft.get_base_model().register_forward_pre_hook(self._clear_stats)

    def remove(self) -> None:
        """Restore PEFT's forward in every layer (the gate's weights are kept; :meth:`install` again)."""
        if not self.installed:
            return
        for module in self._gated_layers():
            vars(module).pop("forward", None)
        self._hook.remove()
        self._hook = None

    def _clear_stats(self, *_: Any) -> None:
        self._stats = []

    # ------------------------------------------------------------------------------- routing

    @property
    def force(self) -> str | None:
        return None if self._force is None else self.experts[self._force]

    @force.setter
    def force(self, expert: str | None) -> None:
        self._force = None if expert is None else self._index(expert)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise DataError(f"gate mode={mode!r} is unknown; use one of {', '.join(MODES)}")
        self._mode = mode

    def _index(self, expert: str) -> int:
        if expert not in self.experts:
            raise DataError(f"expert {expert!r} is not in the gate; gated experts: {', '.join(self.experts)}")
        return self.experts.index(expert)

    def is_mature(self, expert: str) -> bool:
        """Whether ``expert`` has had ``mature_steps`` gate-training steps since it joined the gate."""
        self._index(expert)
        return self.steps[expert] >= self.mature_steps

    def record_steps(self, n: int = 1) -> None:
        """Count ``n`` gate-training steps for every gated expert (maturity clock)."""
        for name in self.experts:
            self.steps[name] += int(n)

    def routing(self) -> str:
        """The routing in effect: ``dense`` or ``sparse`` (``auto`` resolved by maturity)."""
        if self._mode != "auto":
            return self._mode
        return "sparse" if all(self.is_mature(e) for e in self.experts) else "dense"

    def gate_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights (..., E) from gate logits: one-hot when forced, the softmax over
        all E (dense), or the softmax over the top-k logits, zero elsewhere (sparse)."""
        n = logits.shape[-1]
        if self._force is not None:
            return F.one_hot(torch.full(logits.shape[:-1], self._force, device=logits.device), n).to(logits.dtype)
        k = min(self.top_k, n)
        if self.routing() == "dense" or k == n:
            return torch.softmax(logits, dim=-1)
        top, idx = logits.topk(k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))

    # ----------------------------------------------------------------------------- balancing

    def _record(self, logits: torch.Tensor) -> None:
        probs = torch.softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
        top1 = F.one_hot(logits.detach().argmax(-1), logits.shape[-1]).to(probs.dtype).reshape(-1, logits.shape[-1])
        mask = self._token_mask
        if mask is not None and tuple(mask.shape) == tuple(logits.shape[:-1]):
            w = mask.reshape(-1, 1).to(probs.dtype)
            denom = w.sum().clamp_min(1.0)
            self._stats.append(((top1 * w).sum(0) / denom, (probs * w).sum(0) / denom))
        else:
            self._stats.append((top1.mean(0), probs.mean(0)))

    def balance_loss(self, coef: float | None = None) -> torch.Tensor:
        """c E sum_e f_e P_e of the last forward with gradients enabled, averaged over the gated
        layers (Switch Transformer's auxiliary loss; c = ``balance_coef`` unless given). Equals c for
        uniform routing."""
        if not self._stats:
            raise DataError("balance_loss() needs a forward of the gated model with gradients enabled first")
        c = self.balance_coef if coef is None else float(coef)
        n = len(self.experts)
        per_layer = torch.stack([(f * p).sum() for f, p in self._stats])
        return c * n * per_layer.mean()

    # ----------------------------------------------------------------------------- training

    def set_trainable(self, joint: bool = False) -> None:
        """Gate trainable; the gated experts' LoRA factors trainable only when ``joint``; the
        corrections, every other adapter and the base frozen. Re-applied after :meth:`add_expert`
        (PEFT's ``add_adapter`` resets requires_grad)."""
        self._joint = bool(joint)
        for p in self.gates.parameters():
            p.requires_grad_(True)
        train = set(self.experts) if joint else set()
        for name, p in self.model.peft.named_parameters():
            parts = name.split(".")  # ...lora_A.<adapter>.weight
            p.requires_grad_(len(parts) > 2 and parts[-3] in ("lora_A", "lora_B") and parts[-2] in train)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, **batch: torch.Tensor):
        """The gated model's forward (PEFT model call); ``attention_mask`` also masks the balance
        statistics (padding tokens do not count)."""
        self._token_mask = batch.get("attention_mask")
        try:
            return self.model.peft(**batch)
        finally:
            self._token_mask = None

    def generate(self, **kwargs: Any):
        """``model.peft.generate`` through the gate (the KV cache works as usual)."""
        return self.model.peft.generate(**kwargs)

    # ---------------------------------------------------------------------------- state / IO

    def gate_state(self) -> dict[str, torch.Tensor]:
        """The gate's weights, ``{layer}.weight`` (E x d_in) and ``{layer}.bias`` (E), detached
        copies: FedAvg of gates is :func:`fedmoe.algorithms.fusion.weighted_average` of these."""
        state = {}
        for layer, gate in zip(self.layer_names, self.gates):
            state[f"{layer}.weight"] = gate.weight.detach().clone()
            state[f"{layer}.bias"] = gate.bias.detach().clone()
        return state

    def load_gate_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`gate_state`-shaped weights (same keys and shapes, else a DataError)."""
        expected = self.gate_state()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            what = f"misses {missing[0]!r}" if missing else f"has unknown key {extra[0]!r}"
            raise DataError(f"gate state {what} ({len(missing)} missing, {len(extra)} unknown); give a state of this gate")
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise DataError(f"gate state: {key} has shape {tuple(value.shape)}, the gate's is {tuple(expected[key].shape)}")
        with torch.no_grad():
            for layer, gate in zip(self.layer_names, self.gates):
                gate.weight.copy_(state[f"{layer}.weight"].to(gate.weight.dtype))
                gate.bias.copy_(state[f"{layer}.bias"].to(gate.bias.dtype))

    def save_gate(self, path: str | Path) -> None:
        """Write the gate (safetensors, atomically) with the expert names, maturity steps and
        settings in its metadata; the experts themselves are PEFT's to save."""
        from safetensors.torch import save

        from fedmoe.federation.checkpoint import atomic_write_bytes

        meta = {
            "format": FORMAT, "experts": json.dumps(list(self.experts)), "steps": json.dumps(self.steps),
            "top_k": str(self.top_k), "mode": self._mode, "mature_steps": str(self.mature_steps),
        }
        tensors = {k: v.contiguous().cpu() for k, v in self.gate_state().items()}
        data = save(tensors, metadata=meta)
        atomic_write_bytes(path, lambda f: f.write(data))

    def load_gate(self, path: str | Path) -> None:
        """Load a gate written by :meth:`save_gate`. A gate for another set of experts is refused
        (DataError naming both); the same experts in another order are permuted into this order."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"gate checkpoint {path} does not exist; write one with save_gate()")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise CheckpointError(f"gate checkpoint {path} is unreadable ({type(e).__name__}); rewrite it with save_gate()") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a gate checkpoint (format {meta.get('format')!r}); write one with save_gate()")
        theirs = list(json.loads(meta["experts"]))
        if sorted(theirs) != sorted(self.experts):
            raise DataError(
                f"gate checkpoint {path} is for experts {theirs} but this gate has experts {list(self.experts)}; "
                "load it into a gate over the same experts"
            )
        order = torch.tensor([theirs.index(e) for e in self.experts])
        self.load_gate_state({k: v.index_select(0, order) for k, v in state.items()})
        steps = json.loads(meta.get("steps", "{}"))
        self.steps = {e: int(steps.get(e, 0)) for e in self.experts}

    # -------------------------------------------------------------------------------- growth

    def add_expert(self, name: str, bias: float = OFF_LOGIT) -> None:
        """Grow the gate by one column for ``name`` (whose adapters the ExpertModel must already
        hold): zero weight row and logit bias ``bias`` in every layer; its maturity clock starts at 0.

        With the default (:data:`OFF_LOGIT`) the new expert's weight is exactly 0 in both modes, so
        the old experts' outputs are unchanged bit for bit; it then receives no gradient either:
        raise its bias (:meth:`set_expert_bias`, e.g. to -4) when the gate should learn to route to
        it. Any bias keeps sparse routing unchanged wherever the old k-th logit exceeds it.
        """
        if name in self.experts:
            raise DataError(f"expert {name!r} is already in the gate")
        self.model._known(name)
        modules = self._gated_layers()
        self._check_adapters(name, modules)
        for gate in self.gates:
            gate.grow(bias)
        self.experts = (*self.experts, name)
        self.steps[name] = 0
        self._plans = [_Plan(m, self.experts) for m in modules]
        if self._joint is not None:
            self.set_trainable(self._joint)

    def set_expert_bias(self, name: str, bias: float) -> None:
        """Set expert ``name``'s logit bias in every layer."""
        i = self._index(name)
        with torch.no_grad():
            for gate in self.gates:
                gate.bias[i] = float(bias)


def _gated_forward(moe: MoELoRA, index: int, module: nn.Module):
    """The patched forward of one PEFT ``lora.Linear``: the base plus the gated expert mixture; PEFT's
    own forward when adapters are disabled or merged, or a mixed batch (``adapter_names``) is asked.

    One matmul gives every expert's A x, every correction's V x and the gate logits (their weights
    stacked), one more adds B diag(g s) (A x) to the base output: the same passes over the
    activations as a single LoRA, only wider. With dropout active (training, p > 0) the experts'
    A rows see dropout(x), one mask shared by all experts, through a separate matmul."""
    peft_forward = type(module).forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if module.disable_adapters or module.merged or kwargs.get("adapter_names") is not None:
            return peft_forward(module, x, *args, **kwargs)
        plan = moe._plans[index]
        gate = moe.gates[index]
        result = module.base_layer(x, *args, **kwargs)
        a_rows = [module.lora_A[n].weight for n in plan.lora]
        v_rows = [module.lora_A[n].weight for n in plan.corr]
        xa = x.to(a_rows[0].dtype)
        dropout = module.lora_dropout[plan.lora[0]]
        if module.training and not isinstance(dropout, nn.Identity) and dropout.p > 0:
            n_lora = sum(a.shape[0] for a in a_rows)
            vz = F.linear(xa, torch.cat([*v_rows, gate.weight.to(xa.dtype)]))
            h = torch.cat([F.linear(dropout(xa), torch.cat(a_rows)), vz[..., : plan.rows - n_lora]], dim=-1)
            z = vz[..., plan.rows - n_lora :]
        else:
            hz = F.linear(xa, torch.cat([*a_rows, *v_rows, gate.weight.to(xa.dtype)]))
            h, z = hz[..., : plan.rows], hz[..., plan.rows :]
        logits = z.to(gate.bias.dtype) + gate.bias
        if torch.is_grad_enabled():
            moe._record(logits)
        weights = moe.gate_weights(logits).to(h.dtype)
        h = h * (weights.index_select(-1, plan.owner.to(h.device)) * plan.scale.to(h.device, h.dtype))
        b = torch.cat([module.lora_B[n].weight for n in plan.lora + plan.corr], dim=1)
        if result.dtype == h.dtype:
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
            return out.view(result.shape)
        return (result + F.linear(h, b)).to(result.dtype)

    return forward


def train_gate(
    model: MoELoRA,
    batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]],
    steps: int,
    lr: float = 1e-3,
    balance_coef: float = 0.01,
    joint: bool = False,
    max_grad_norm: float | None = 1.0,
) -> list[float]:
    """Train the gate (and, ``joint``, the gated experts' LoRA factors; corrections and base stay
    frozen) for ``steps`` AdamW steps on ``(inputs, labels)`` batches (re-iterated when exhausted);
    loss = mean cross-entropy over response tokens + the balance loss with c = ``balance_coef``.
    Advances the maturity clock one step per optimizer step. Returns the per-step total losses."""
    if steps < 1:
        raise DataError(f"steps={steps} must be a positive integer")
    model.set_trainable(joint)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    stream = response_batches(batches, "the gate's training batches are empty or have no response tokens")
    try:
        while len(losses) < steps:
            inputs, labels, _ = next(stream)
            out = model(**inputs, labels=labels, use_cache=False)
            loss = out.loss + model.balance_loss(balance_coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            model.record_steps(1)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DataError(f"the gate's training loss is {value} at step {len(losses) + 1}; lower lr")
            losses.append(value)
    finally:
        model.eval()
    return losses
