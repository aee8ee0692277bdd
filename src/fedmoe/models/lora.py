"""PEFT adapters on a transformers model: the adapter spec, config builders, and layout readers.

A client network carries one PEFT adapter (LoRA or VeRA) plus the trainable classification head;
the aggregation rules in :mod:`fedmoe.algorithms.lora` see it only through the records that
:func:`adapted_layers` reads here (state-dict keys, scaling ``layer.scaling[adapter]``, weight
layout), so they stay pure functions over state dicts.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from fedmoe.algorithms.lora.layout import LoRALayer, SORFVeRALayer, VeRALayer
from fedmoe.errors import DataError, FedMoEError

ADAPTER_TYPES = ("lora", "vera", "sorf_vera", "none")

#: Modules adapted when the spec names none (the FedEx-LoRA paper adapts attention query and value).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
}

AdapterLayer = LoRALayer | VeRALayer | SORFVeRALayer

#: Heads of transformers' sequence classifiers (PEFT's ``modules_to_save`` for SEQ_CLS).
HEAD_MODULES = ("classifier", "score")

#: Architectures whose weights are transformers' ``Conv1D`` (d_in x d_out storage).
_FAN_IN_FAN_OUT = frozenset({"gpt2"})


@dataclass(frozen=True)
class AdapterSpec:
    """What to adapt and how; the ``adapter:`` mapping of a config.

    ``alpha`` is LoRA's alpha (s = alpha / r, alpha / sqrt(r) with ``use_rslora``); VeRA ignores it.
    ``init_seed`` seeds the whole build (config-built base, new head, adapter init) so that two
    builds are identical; None draws from the global RNG. ``projection_prng_key`` seeds VeRA's
    shared projections (default: ``init_seed`` or 0). ``options`` go to the adapter's builder
    unchanged (SORF-VeRA's own settings).
    """

    type: str = "lora"
    r: int = 4
    alpha: float = 8.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_seed: int | None = None
    fan_in_fan_out: bool | None = None
    projection_prng_key: int | None = None
    d_initial: float = 0.1
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, adapter: dict[str, Any] | None) -> AdapterSpec:
        """The spec of a config mapping (None: LoRA with the defaults); unknown keys are an error
        except for ``sorf_vera``, whose extra keys go to ``options``."""
        data = dict(adapter or {})
        kind = data.get("type", "lora")
        if kind not in ADAPTER_TYPES:
            raise FedMoEError(f"adapter.type={kind!r} is unknown; use one of {', '.join(ADAPTER_TYPES)}")
        known = {f.name for f in fields(cls)} - {"options"}
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        if extra and kind != "sorf_vera":
            raise FedMoEError(
                f"adapter has unknown keys {sorted(extra)}; known keys: {', '.join(sorted(known))}"
            )
        targets = data.get("target_modules")
        if targets is not None and not isinstance(targets, str):
            data["target_modules"] = tuple(targets)
        if int(data.get("r", 4)) < 1:
            raise FedMoEError(f"adapter.r={data['r']} must be a positive integer")
        return cls(**data, options=extra)

    def targets_for(self, model_type: str) -> tuple[str, ...] | str:
        """The target modules, or the architecture's defaults (:data:`DEFAULT_TARGETS`)."""
        if self.target_modules is not None:
            return self.target_modules
        if model_type not in DEFAULT_TARGETS:
            raise FedMoEError(
                f"no default adapter.target_modules for model_type {model_type!r}; name them "
                f"(defaults exist for {', '.join(sorted(DEFAULT_TARGETS))})"
            )
        return DEFAULT_TARGETS[model_type]


def default_target_modules(model_type: str) -> list[str]:
    """The modules adapted by default for an architecture (:data:`DEFAULT_TARGETS`)."""
    return list(AdapterSpec().targets_for(model_type))


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` and ``Conv1D`` layers an adapter can target."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _matches(target: str, name: str) -> bool:
    return name == target or name.endswith("." + target)


def check_target_modules(model: nn.Module, targets: tuple[str, ...] | str) -> None:
    """Every target must match at least one adaptable layer (PEFT's matching: the full name or
    its dotted suffix; a string is a regular expression over full names)."""
    names = adaptable_module_names(model)
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = [t for t in targets if not any(_matches(t, n) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise DataError(
            f"adapter.target_modules {missing} match no Linear or Conv1D layer of the model; "
            f"its layer names include: {', '.join(leaves[:12])}"
        )


def lora_config(spec: AdapterSpec, model_type: str):
    """PEFT's ``LoraConfig`` for a sequence classifier (the head goes to ``modules_to_save``)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="SEQ_CLS",
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=_peft_targets(spec.targets_for(model_type)),
        use_rslora=spec.use_rslora,
        rank_pattern=dict(spec.rank_pattern),
        alpha_pattern=dict(spec.alpha_pattern),
        fan_in_fan_out=_fan_in_fan_out(spec, model_type),
    )


def vera_config(spec: AdapterSpec, model_type: str):
    """PEFT's ``VeraConfig`` with the shared projections saved in the state dict, so every copy of
    the network holds (and the rules read) the same A_s and B_s."""
    from peft import VeraConfig

    key = spec.projection_prng_key
    if key is None:
        key = spec.init_seed or 0
    return VeraConfig(
        task_type="SEQ_CLS",
        r=spec.r,
        vera_dropout=spec.dropout,
        target_modules=_peft_targets(spec.targets_for(model_type)),
        projection_prng_key=key,
        save_projection=True,
        d_initial=spec.d_initial,
        fan_in_fan_out=_fan_in_fan_out(spec, model_type),
    )


def _peft_targets(targets: tuple[str, ...] | str) -> list[str] | str:
    return targets if isinstance(targets, str) else list(targets)


def _fan_in_fan_out(spec: AdapterSpec, model_type: str) -> bool:
    return spec.fan_in_fan_out if spec.fan_in_fan_out is not None else model_type in _FAN_IN_FAN_OUT


def apply_adapter(model: nn.Module, spec: AdapterSpec, model_type: str) -> nn.Module:
    """Wrap a transformers sequence classifier with the spec's adapter (``get_peft_model``): the
    adapter and the head train, everything else is frozen. ``none``: the model unchanged (full
    fine-tuning)."""
    if spec.type == "none":
        return model
    check_target_modules(model, spec.targets_for(model_type))
    if spec.type == "sorf_vera":
        return apply_sorf_vera(model, spec, model_type)
    from peft import get_peft_model

    config = lora_config(spec, model_type) if spec.type == "lora" else vera_config(spec, model_type)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FedMoEError(f"cannot apply adapter type {spec.type!r}: {first}") from err
    _check_supported_layers(wrapped)
    return wrapped


def sorf_vera_config(spec: AdapterSpec, model_type: str):
    """:class:`fedmoe.models.sorf_vera.SORFVeRAConfig` of a spec; its extra keys (``sorf_seed``,
    ``train_b``, ``save_projection``) pass through."""
    from fedmoe.models.sorf_vera import SORFVeRAConfig

    key = spec.projection_prng_key
    if key is None:
        key = spec.init_seed or 0
    targets = spec.targets_for(model_type)
    set_here = {"r", "target_modules", "projection_prng_key", "d_initial", "dropout", "modules_to_save", "adapter_name"}
    own = {f.name for f in fields(SORFVeRAConfig)} - set_here
    unknown = sorted(set(spec.options) - own)
    if unknown:
        raise FedMoEError(f"adapter has unknown keys {unknown} for sorf_vera; its own keys: {', '.join(sorted(own))}")
    return SORFVeRAConfig(
        r=spec.r,
        target_modules=_peft_targets(targets),
        projection_prng_key=key,
        d_initial=spec.d_initial,
        dropout=spec.dropout,
        modules_to_save=list(HEAD_MODULES),
        **spec.options,
    )


def apply_sorf_vera(model: nn.Module, spec: AdapterSpec, model_type: str) -> nn.Module:
    """SORF-VeRA layers on the targets (:func:`fedmoe.models.sorf_vera.apply_sorf_vera`, in place),
    the head trainable, the rest frozen."""
    from fedmoe.models import sorf_vera

    return sorf_vera.apply_sorf_vera(model, sorf_vera_config(spec, model_type))


def _check_supported_layers(model: nn.Module) -> None:
    from peft.tuners import lora

    for name, module in model.named_modules():
        if isinstance(module, lora.LoraLayer) and not isinstance(module, lora.Linear):
            raise FedMoEError(
                f"adapted layer {name!r} is a {type(module).__name__}; the aggregation rules support "
                "LoRA on Linear and Conv1D layers only: change adapter.target_modules"
            )


def adapted_layers(model: nn.Module, prefix: str = "", adapter_name: str = "default") -> list[AdapterLayer]:
    """One record per adapted layer of ``model``, keys relative to ``model.state_dict()`` (with
    ``prefix`` prepended), LoRA layers in module order, then VeRA, then SORF-VeRA.

    LoRA: scaling is ``layer.scaling[adapter_name]`` (alpha / r, alpha / sqrt(r) with rsLoRA,
    after rank_pattern and alpha_pattern). VeRA (:func:`fedmoe.models.vera.vera_layers`) and
    SORF-VeRA (:func:`fedmoe.models.sorf_vera.sorf_vera_layers`): the shared projections sliced to
    each layer's shape as the layer's forward slices them.
    """
    from peft.tuners import lora

    from fedmoe.models.sorf_vera import sorf_vera_layers
    from fedmoe.models.vera import vera_layers

    records: list[AdapterLayer] = [
        LoRALayer(
            name=name,
            base_key=f"{name}.base_layer.weight",
            a_key=f"{name}.lora_A.{adapter_name}.weight",
            b_key=f"{name}.lora_B.{adapter_name}.weight",
            scaling=float(module.scaling[adapter_name]),
            fan_in_fan_out=bool(module.fan_in_fan_out),
        )
        for name, module in model.named_modules()
        if isinstance(module, lora.LoraLayer) and adapter_name in module.lora_A
    ]
    records += vera_layers(model, adapter_name)
    records += sorf_vera_layers(model, adapter_name)
    return [_prefixed(r, prefix) for r in records] if prefix else records


def _prefixed(record: AdapterLayer, prefix: str) -> AdapterLayer:
    keys = {
        f.name: prefix + getattr(record, f.name)
        for f in fields(record)
        if f.name == "name" or f.name.endswith("_key")
    }
    return replace(record, **keys)


def delta_weight(record: AdapterLayer, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer's update in ``nn.Linear`` layout (d_out x d_in): s B A (LoRA),
    diag(b) B_s diag(d) A_s (VeRA), S Gamma(b) B_s Lambda_d A_s (SORF-VeRA)."""
    if isinstance(record, LoRALayer):
        return record.scaling * state[record.b_key] @ state[record.a_key]
    if isinstance(record, SORFVeRALayer):
        from fedmoe.algorithms.lora.sorf_vera import sorf_delta

        return sorf_delta(
            record.sorf, state[record.b_real_key], state[record.b_imag_key], record.proj_b,
            state[record.d_scale_key], state[record.d_angles_key], record.proj_a,
        )
    b = state[record.lambda_b_key].unsqueeze(-1)
    d = state[record.lambda_d_key].unsqueeze(-1)
    return (b * record.proj_b) @ (d * record.proj_a)
