"""A frozen causal LM with one LoRA expert per domain, each beside its frozen correction (DESIGN.md §4).

The base (Qwen2, Llama, ... from a local folder, or a tiny one built from a config) is shared by
every expert and never changes. An expert ``e`` is two PEFT LoRA adapters on the same target layers:

- ``e``: the trainable LoRA, delta = s B A (s = alpha / r);
- ``e__corr``: its frozen correction, LoRA with scaling 1 holding U as ``lora_B`` (d_out x k) and V
  as ``lora_A`` (k x d_in), k the rank budget (factors of lower rank are zero-padded).

Activating ``e`` makes both adapters active (PEFT 0.21 sums every active LoRA in a layer's forward),
with gradients on ``e`` only, so the expert's effective weight is W + U V + s B A: an exact
aggregation's residual (FedEx, the exact async mix) lives in U V without touching the shared base.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.data.instructions import IGNORE_INDEX, response_batches
from fedmoe.errors import DataError
from fedmoe.models.local import resolve_local_dir
from fedmoe.models.lora import AdapterSpec, check_target_modules

CORRECTION_SUFFIX = "__corr"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Tiny architectures for tests and smoke runs (hidden 32, 2 layers, 4 heads, 2 KV heads).
TINY_CAUSAL: dict[str, dict[str, Any]] = {
    arch: {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": True,
    }
    for arch in ("qwen2", "llama")
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``float32``, ``bfloat16``, ``float16``) or itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DataError(f"dtype={dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_causal_lm(spec: str | Path, dtype: str | torch.dtype = "float32"):
    """``AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)`` in ``dtype``; the folder
    is a path or ``package:NAME`` (:func:`fedmoe.models.local.resolve_local_dir`). Nothing is downloaded."""
    folder = resolve_local_dir(str(spec), "causal LM folder")
    if not (folder / "config.json").is_file():
        raise DataError(f"causal LM folder {folder} has no config.json; give a folder written by save_pretrained")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=resolve_dtype(dtype))
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"causal LM folder {folder} does not load: {reason}") from None
    return model


def tiny_causal_config(model_type: str = "qwen2", vocab_size: int = 128, **overrides: Any):
    """A transformers config for a tiny causal LM (:data:`TINY_CAUSAL`); pad/bos/eos ids 0/1/2,
    inside the vocabulary, unless overridden."""
    if model_type not in TINY_CAUSAL:
        raise DataError(f"no tiny causal config for model_type {model_type!r}; known: {', '.join(TINY_CAUSAL)}")
    from transformers import AutoConfig

    values = {"vocab_size": vocab_size, "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2, "use_cache": False, **TINY_CAUSAL[model_type], **overrides}
    return AutoConfig.for_model(model_type, **values)


def build_causal_lm(config: Any, seed: int = 0, dtype: str | torch.dtype = "float32"):
    """A randomly initialised causal LM of ``config`` (a config object or a ``model_type`` mapping),
    seeded so two builds are identical."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, Mapping):
        values = dict(config)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(resolve_dtype(dtype))


def load_causal_tokenizer(spec: str | Path):
    """A tokenizer from a local folder (or ``package:NAME``); pads with EOS when it has no pad token."""
    from fedmoe.data.glue import load_tokenizer

    return load_tokenizer(spec)


def check_tokenizer_fits(model: nn.Module, tokenizer: Any, model_dir: Any = None, tokenizer_dir: Any = None) -> None:
    """Refuse a tokenizer with ids beyond the model's embedding rows (its size or any special id),
    naming both folders."""
    rows = model.get_input_embeddings().num_embeddings
    specials = [getattr(tokenizer, f"{k}_token_id", None) for k in ("pad", "bos", "eos", "unk")]
    top = max([len(tokenizer) - 1, *(s for s in specials if s is not None)])
    if top >= rows:
        where_t = tokenizer_dir if tokenizer_dir is not None else "(given object)"
        where_m = model_dir if model_dir is not None else "(built from config)"
        raise DataError(
            f"tokenizer {where_t} has ids up to {top} but the model {where_m} embeds only {rows} tokens; "
            "use the model's own tokenizer"
        )


def load_causal(
    model: str | Path, tokenizer: str | Path | None = None, dtype: str | torch.dtype = "float32"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from local folders (the tokenizer from the model folder by default),
    checked to fit (:func:`check_tokenizer_fits`)."""
    lm = load_causal_lm(model, dtype)
    tok_spec = model if tokenizer is None else tokenizer
    tok = load_causal_tokenizer(tok_spec)
    check_tokenizer_fits(lm, tok, model, tok_spec)
    return lm, tok


def correction_name(expert: str) -> str:
    """The PEFT adapter name of an expert's frozen correction."""
    return f"{expert}{CORRECTION_SUFFIX}"


CorrectionFactors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LocalResult:
    """One worker step: the trained adapter state (:meth:`ExpertModel.expert_state`), the mean of
    the step losses, and what it cost (optimizer steps, tokens attended, response tokens, seconds)."""

    state: dict[str, torch.Tensor]
    mean_loss: float
    steps: int
    tokens: int
    response_tokens: int
    seconds: float


class ExpertModel(nn.Module):
    """One frozen base wrapped by PEFT with, per expert, a trainable LoRA and a frozen correction.

    Args:
        base: a transformers causal LM; its parameters are frozen in place.
        experts: expert names (``python``, ``sql``, ...), unique; none ends in ``__corr``.
        adapter: LoRA settings (:class:`fedmoe.models.lora.AdapterSpec` or its mapping: r, alpha,
            dropout, target_modules, use_rslora, init_seed); targets default to the architecture's
            (q_proj, v_proj for Qwen2 and Llama).
        correction_rank: the rank budget k of every correction (>= 1).

    Adapters are fp32 whatever the base dtype (PEFT's ``autocast_adapter_dtype``). State keys are
    those of ``self.peft.state_dict()``, as :meth:`adapted_layers` names them.
    """

    def __init__(
        self,
        base: nn.Module,
        experts: Sequence[str],
        adapter: AdapterSpec | Mapping[str, Any] | None = None,
        correction_rank: int = 8,
    ) -> None:
        super().__init__()
        spec = adapter if isinstance(adapter, AdapterSpec) else AdapterSpec.from_dict(dict(adapter or {}))
        if spec.type != "lora":
            raise DataError(f"experts are LoRA adapters; adapter.type={spec.type!r} is not supported")
        self.experts = _check_expert_names(experts)
        if int(correction_rank) < 1:
            raise DataError(f"correction_rank={correction_rank} must be a positive integer")
        self.correction_rank = int(correction_rank)
        self.spec = spec
        targets = spec.targets_for(base.config.model_type)
        check_target_modules(base, targets)
        for p in base.parameters():
            p.requires_grad_(False)
        from peft import LoraConfig, get_peft_model

        targets = targets if isinstance(targets, str) else list(targets)
        expert_cfg = LoraConfig(
            task_type="CAUSAL_LM", r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
            target_modules=targets, use_rslora=spec.use_rslora, rank_pattern=dict(spec.rank_pattern),
            alpha_pattern=dict(spec.alpha_pattern),
        )
        k = self.correction_rank
        corr_cfg = LoraConfig(task_type="CAUSAL_LM", r=k, lora_alpha=k, lora_dropout=0.0, target_modules=targets)
        self._configs = (expert_cfg, corr_cfg)
        with torch.random.fork_rng(devices=[], enabled=spec.init_seed is not None), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            if spec.init_seed is not None:
                torch.manual_seed(spec.init_seed)
            self.peft = get_peft_model(base, expert_cfg, adapter_name=self.experts[0])
            for i, name in enumerate(self.experts):
                if i:
                    self.peft.add_adapter(name, expert_cfg)
                self.peft.add_adapter(correction_name(name), corr_cfg)
        for name in self.experts:
            self.load_corrections(name, None)
        self.active: str | None = None
        self.activate(self.experts[0])

    def add_expert(self, name: str) -> None:
        """Grow the model by one expert (continual growth): its LoRA ``name`` (PEFT's initialisation,
        B = 0, so the new expert starts as the base) and its zero correction; the active expert and
        its gradients are kept, the existing experts untouched."""
        _check_expert_names([*self.experts, name])
        expert_cfg, corr_cfg = self._configs
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            self.peft.add_adapter(name, expert_cfg)
            self.peft.add_adapter(correction_name(name), corr_cfg)
        self.experts = (*self.experts, name)
        self.load_corrections(name, None)
        self.activate(self.active)

    # ------------------------------------------------------------------------ adapters and state

    def _known(self, expert: str) -> str:
        if expert not in self.experts:
            raise DataError(f"expert {expert!r} is unknown; experts: {', '.join(self.experts)}")
        return expert

    def activate(self, expert: str | None) -> None:
        """Make ``expert`` (its LoRA and its correction) the active adapters, gradients on its LoRA
        only; None: the base alone (adapters bypassed in :meth:`forward`)."""
        if expert is None:
            self.active = None
            return
        self._known(expert)
        self.peft.base_model.set_adapter([expert, correction_name(expert)])
        corr = f".{correction_name(expert)}."
        for name, p in self.peft.named_parameters():
            if corr in name:
                p.requires_grad_(False)
        self.active = expert

    def adapted_layers(self, expert: str) -> list[LoRALayer]:
        """The expert's LoRA layers (keys into ``self.peft.state_dict()``), in module order."""
        from fedmoe.models.lora import adapted_layers

        return adapted_layers(self.peft, adapter_name=self._known(expert))

    def expert_state(self, expert: str) -> dict[str, torch.Tensor]:
        """A detached copy of the expert's trainable LoRA factors (A and B of every layer)."""
        state = self.peft.state_dict()
        return {
            key: state[key].detach().clone()
            for layer in self.adapted_layers(expert)
            for key in (layer.a_key, layer.b_key)
        }

    def _adapted_modules(self, expert: str) -> dict[str, nn.Module]:
        names = {layer.name for layer in self.adapted_layers(expert)}
        return {n: m for n, m in self.peft.named_modules() if n in names}

    def correction_factors(self, expert: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer name, the correction's (U, V) at the full budget (zero-padded), copies."""
        corr = correction_name(self._known(expert))
        return {
            name: (m.lora_B[corr].weight.detach().clone(), m.lora_A[corr].weight.detach().clone())
            for name, m in self._adapted_modules(expert).items()
        }

    def load_corrections(self, expert: str, factors: CorrectionFactors | None) -> None:
        """Set the expert's correction: ``factors[layer] = (U, V)``, U d_out x k', V k' x d_in with
        k' <= the budget (zero-padded); a layer not named (or None for all) gets a zero correction."""
        corr = correction_name(self._known(expert))
        modules = self._adapted_modules(expert)
        factors = dict(factors or {})
        unknown = sorted(set(factors) - set(modules))
        if unknown:
            raise DataError(f"correction factors for expert {expert!r} name unknown layers {unknown[:3]}")
        k = self.correction_rank
        with torch.no_grad():
            for name, module in modules.items():
                a, b = module.lora_A[corr].weight, module.lora_B[corr].weight
                a.zero_()
                b.zero_()
                if name not in factors:
                    continue
                u, v = factors[name]
                rank = u.shape[1] if u.dim() == 2 else -1
                if u.dim() != 2 or v.dim() != 2 or u.shape[0] != b.shape[0] or v.shape[1] != a.shape[1] or v.shape[0] != rank:
                    raise DataError(
                        f"correction of expert {expert!r} at {name}: U {tuple(u.shape)} and V {tuple(v.shape)} "
                        f"do not make a {b.shape[0]} x {a.shape[1]} update"
                    )
                if rank > k:
                    raise DataError(
                        f"correction of expert {expert!r} at {name} has rank {rank} > correction_rank={k}; "
                        "truncate it (SVD) or raise correction_rank"
                    )
                b[:, :rank] = u.to(b.dtype)
                a[:rank] = v.to(a.dtype)

    def load_expert(
        self, expert: str, adapter_state: Mapping[str, torch.Tensor], correction_factors: CorrectionFactors | None = None
    ) -> None:
        """Load the expert's LoRA factors (exactly the keys of :meth:`expert_state`, same shapes) and
        its correction (:meth:`load_corrections`)."""
        state = self.peft.state_dict()
        expected = {key: state[key] for layer in self.adapted_layers(expert) for key in (layer.a_key, layer.b_key)}
        missing = sorted(set(expected) - set(adapter_state))
        extra = sorted(set(adapter_state) - set(expected))
        if missing or extra:
            what = f"misses {missing[0]!r}" if missing else f"has unknown key {extra[0]!r}"
            raise DataError(
                f"adapter state for expert {expert!r} {what} ({len(missing)} missing, {len(extra)} unknown)"
            )
        for key, value in adapter_state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise DataError(
                    f"adapter state for expert {expert!r}: {key} has shape {tuple(value.shape)}, "
                    f"the model's is {tuple(expected[key].shape)}"
                )
        params = dict(self.peft.named_parameters())
        with torch.no_grad():
            for key, value in adapter_state.items():
                params[key].copy_(value.to(params[key].dtype))
        self.load_corrections(expert, correction_factors)

    def effective_delta(self, expert: str, layer: str) -> torch.Tensor:
        """U V + s B A of one adapted layer (``nn.Linear`` layout, d_out x d_in, fp32)."""
        record = next((r for r in self.adapted_layers(expert) if r.name == layer), None)
        if record is None:
            raise DataError(f"expert {expert!r} adapts no layer {layer!r}")
        state = self.peft.state_dict()
        u, v = self.correction_factors(expert)[layer]
        return u.float() @ v.float() + record.scaling * state[record.b_key].float() @ state[record.a_key].float()

    # ------------------------------------------------------------------------------ running

    def forward(self, **batch: torch.Tensor):
        """The active expert's forward (the base alone when none is active)."""
        if self.active is None:
            with self.peft.disable_adapter():
                return self.peft(**batch)
        return self.peft(**batch)

    def train_steps(
        self,
        expert: str,
        batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]],
        steps: int,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
    ) -> LocalResult:
        """One worker step: ``steps`` AdamW steps (fresh optimizer) on the expert's LoRA, batches
        ``(inputs, labels)`` drawn from ``batches`` (re-iterated when exhausted); the loss is the mean
        cross-entropy over response tokens (labels != -100)."""
        if steps < 1:
            raise DataError(f"steps={steps} must be a positive integer")
        gated = [layer.name for layer in self.adapted_layers(self._known(expert))
                 if "forward" in vars(self.peft.get_submodule(layer.name))]
        if gated:
            raise DataError(
                f"a per-token gate (MoELoRA) is installed on this model ({gated[0]} and {len(gated) - 1} more layers "
                f"route every forward through it), so training expert {expert!r} alone would train the mixture; "
                "call the gate's remove() first and install() it again after training"
            )
        self.activate(expert)
        params = [p for p in self.peft.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.train()
        losses: list[float] = []
        tokens = response = 0
        start = time.perf_counter()
        stream = response_batches(batches, "the training batches are empty or have no response tokens; give the worker data")
        while len(losses) < steps:
            inputs, labels, n_resp = next(stream)
            tokens += int(inputs["attention_mask"].sum())
            response += n_resp
            loss = self.peft(**inputs, labels=labels, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            losses.append(float(loss.detach()))
        self.eval()
        return LocalResult(
            self.expert_state(expert), sum(losses) / len(losses), len(losses), tokens, response,
            time.perf_counter() - start,
        )

    @torch.no_grad()
    def heldout_loss(self, expert: str | None, batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> float:
        """Mean next-token cross-entropy over every response token of ``batches`` (token-weighted
        across batches), with ``expert`` active or the base alone (None). Perplexity = exp(loss)."""
        previous = self.active
        self.activate(expert)
        was_training = self.training
        self.eval()
        total, count = 0.0, 0
        try:
            for inputs, labels in batches:
                logits = self(**inputs, use_cache=False).logits[:, :-1].float()
                target = labels[:, 1:]
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="sum"))
                count += int((target != IGNORE_INDEX).sum())
        finally:
            self.train(was_training)
            self.activate(previous)
        if count == 0:
            raise DataError("the held-out batches have no response tokens to score")
        return total / count


def perplexity(loss: float) -> float:
    """exp(mean token loss)."""
    return math.exp(loss)


def _check_expert_names(experts: Sequence[str]) -> tuple[str, ...]:
    names = tuple(experts)
    if not names:
        raise DataError("an ExpertModel needs at least one expert name")
    if len(set(names)) != len(names):
        raise DataError(f"expert names repeat: {list(names)}")
    for name in names:
        if not isinstance(name, str) or not name or "." in name or name.endswith(CORRECTION_SUFFIX):
            raise DataError(f"expert name {name!r} must be a non-empty string without '.' not ending in {CORRECTION_SUFFIX!r}")
        if name in "lora_":
            raise DataError(f"expert name {name!r} is a substring of 'lora_', which PEFT mistakes on load; use a real name")
    return names
