"""SORF-VeRA as a PEFT-style tuner layer, and the function that puts it on a model's target modules.

Relation to PEFT's VeRA (``peft.tuners.vera.layer.Linear``): the same skeleton. The layer wraps the
original module as ``base_layer`` (``nn.Linear``, or GPT-2's ``Conv1D`` with ``fan_in_fan_out``),
holds references to shared frozen projections ``A_s`` (r x max d_in) and ``B_s`` (max d_out x r) in
:class:`peft.tuners._buffer_dict.BufferDict` objects, drawn exactly as PEFT draws ``vera_A`` and
``vera_B`` (Kaiming-uniform from one CPU generator seeded with ``projection_prng_key``, A first, sized
by the largest target layer, sliced per layer), and keeps its trainable tensors in ``ParameterDict``s
keyed by adapter name. It subclasses PEFT's ``BaseTunerLayer``, so ``set_adapter``,
``enable_adapters``, ``merge`` / ``unmerge`` and ``get_delta_weight`` behave as in PEFT. Where
VeRA's delta W is diag(lambda_b) B_s diag(lambda_d) A_s, SORF-VeRA's (seed 004's fork,
``models.py: _sorf_vera_forward`` and ``create_peft_sorf_vera_model``) is

    delta W = S Gamma(b) B_s Lambda_d A_s,   Lambda_d = scale * G(angles)

with a frozen orthonormal mixer S per output size (from ``sorf_seed``), b = (b_real, b_imag) in place
of lambda_b (complex 2x2 blocks, identity at init) and a scaled Givens rotation in place of
diag(lambda_d) (see :mod:`fedmoe.algorithms.lora.sorf_vera` for the math). As in the reference, only
``scale`` and ``angles`` are trained (``train_b=True`` trains b too), ``scale`` starts at
``d_initial`` = 0.1 and angles at 0, so delta W = 0.1 S B_s A_s is not zero at init (unlike VeRA,
whose lambda_b starts at 0); ``d_initial=0`` starts from the base model.

Cost: every forward builds Lambda_d from r (r - 1) / 2 angles (forward plus backward on one CPU
thread, per layer: 0.01 s at r = 16, 0.06 s at r = 32, 0.4 s at r = 128, 2 s at r = 256) and
multiplies by the dense d_out x d_out S; on a CPU keep r at 32 or below.

State-dict keys per adapted module ``m`` (adapter ``default``): ``m.base_layer.weight`` (and bias),
``m.sorf_b_real.default``, ``m.sorf_b_imag.default``, ``m.sorf_d_scale.default`` (a 0-d tensor),
``m.sorf_d_angles.default``, and, with ``save_projection`` (default, as PEFT), the shared buffers
``m.sorf_A.default``, ``m.sorf_B.default``, ``m.sorf_S.default``; without it the projections are
rebuilt from the seeds and stay out of the state dict.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedmoe.algorithms.lora.layout import SORFVeRALayer
from fedmoe.algorithms.lora.sorf_vera import apply_gamma, lambda_d, num_angles, sorf_delta, sorf_matrix
from fedmoe.errors import FedMoEError


@dataclass
class SORFVeRAConfig:
    """Options of :func:`apply_sorf_vera` (names as PEFT's ``VeraConfig`` where they exist).

    Attributes:
        r: rank of the shared projections.
        target_modules: module names (a name matches itself or any ``*.name``) or one regex
            matched against full module paths, as PEFT.
        projection_prng_key: seed of A_s and B_s (PEFT's VeRA key: same key, same projections).
        sorf_seed: seed of the mixers S (the reference's ``--sorf_seed``, default 42).
        d_initial: initial ``scale`` of Lambda_d (the reference's ``--d_initial``).
        train_b: also train (b_real, b_imag); the reference keeps them frozen on the clients.
        dropout: dropout on the adapter's input (PEFT's ``vera_dropout``; the reference has none).
        save_projection: keep A_s, B_s and S in the state dict.
        modules_to_save: modules left trainable besides the adapters (the classification head).
        adapter_name: key of the adapter's tensors.
    """

    r: int = 256
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    projection_prng_key: int = 0
    sorf_seed: int = 42
    d_initial: float = 0.1
    train_b: bool = False
    dropout: float = 0.0
    save_projection: bool = True
    modules_to_save: list[str] | None = None
    adapter_name: str = "default"


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with gain sqrt(2) over fan_in = shape[1], as PEFT's ``vera.model._kaiming_init``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)  # d_in x d_out
    raise TypeError(type(module).__name__)


class SORFVeRALinear(nn.Module, BaseTunerLayer):
    """A SORF-VeRA adapter on an ``nn.Linear`` or ``Conv1D``: base(x) + x A^T Lambda^T B^T Gamma^T S^T."""

    adapter_layer_names = ("sorf_b_real", "sorf_b_imag", "sorf_d_scale", "sorf_d_angles")
    other_param_names = ("sorf_A", "sorf_B", "sorf_S", "sorf_dropout", "r")

    def __init__(
        self,
        base_layer: nn.Module,
        sorf_A: BufferDict,
        sorf_B: BufferDict,
        sorf_S: BufferDict,
        adapter_name: str,
        r: int,
        d_initial: float = 0.1,
        train_b: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = _in_out(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        if self.out_features % 2:
            raise FedMoEError(
                f"SORF-VeRA needs an even number of output features (Gamma pairs them), a layer has "
                f"{self.out_features}; leave it out of target_modules"
            )
        self.r = {adapter_name: r}
        self.sorf_A, self.sorf_B, self.sorf_S = sorf_A, sorf_B, sorf_S
        self.sorf_dropout = nn.ModuleDict({adapter_name: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        k = self.out_features // 2
        self.sorf_b_real = nn.ParameterDict({adapter_name: nn.Parameter(torch.ones(k))})
        self.sorf_b_imag = nn.ParameterDict({adapter_name: nn.Parameter(torch.zeros(k))})
        self.sorf_d_scale = nn.ParameterDict({adapter_name: nn.Parameter(torch.tensor(float(d_initial)))})
        self.sorf_d_angles = nn.ParameterDict({adapter_name: nn.Parameter(torch.zeros(num_angles(r)))})
        # PEFT's mechanism for adapter weights that stay frozen when the adapter is activated.
        self.frozen_peft_weight_names = {} if train_b else {adapter_name: ("sorf_b_real", "sorf_b_imag")}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.set_adapter(adapter_name)
        weight = base_layer.weight
        for name in ("sorf_b_real", "sorf_b_imag", "sorf_d_scale", "sorf_d_angles"):
            getattr(self, name)[adapter_name].data = getattr(self, name)[adapter_name].data.to(weight.device)

    def _pieces(self, adapter: str) -> tuple[torch.Tensor, ...]:
        return (
            self.sorf_S[adapter],
            self.sorf_b_real[adapter],
            self.sorf_b_imag[adapter],
            self.sorf_B[adapter][: self.out_features, :],
            self.sorf_d_scale[adapter],
            self.sorf_d_angles[adapter],
            self.sorf_A[adapter][:, : self.in_features],
        )

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """delta W in the base weight's layout (transposed for ``Conv1D``)."""
        s, b_real, b_imag, proj_b, scale, angles, proj_a = self._pieces(adapter)
        return transpose(sorf_delta(s, b_real, b_imag, proj_b, scale, angles, proj_a), self.fan_in_fan_out)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.sorf_d_scale:
                continue
            weight = self.get_base_weight() + self.get_delta_weight(adapter).to(self.get_base_weight().dtype)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {adapter} seems broken")
            self.set_base_weight(weight)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.get_base_weight()
            self.set_base_weight(weight - self.get_delta_weight(adapter).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        previous = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.sorf_d_scale:
                continue
            s, b_real, b_imag, proj_b, scale, angles, proj_a = self._pieces(adapter)
            h = F.linear(self.sorf_dropout[adapter](x).to(scale.dtype), proj_a)
            h = h @ lambda_d(scale, angles, proj_a.shape[0]).T
            h = apply_gamma(F.linear(h, proj_b), b_real, b_imag)
            result = result + F.linear(h, s)
        return result.to(previous)

    def __repr__(self) -> str:
        return "sorf_vera." + super().__repr__()


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_sorf_vera(model: nn.Module, config: SORFVeRAConfig) -> nn.Module:
    """Replace ``model``'s target modules by :class:`SORFVeRALinear` in place and freeze everything
    except the adapters' trainable tensors and ``modules_to_save``; returns ``model``."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and _matches(name, config.target_modules) and isinstance(module, (nn.Linear, Conv1D))
    ]
    if not targets:
        raise FedMoEError(
            f"SORF-VeRA target_modules={config.target_modules!r} match no nn.Linear or Conv1D layer of "
            f"{type(model).__name__}; name layers that exist (e.g. query, value)"
        )
    if config.r < 1:
        raise FedMoEError(f"SORF-VeRA r={config.r} must be a positive integer")
    max_in = max(_in_out(m)[0] for _, m in targets)
    max_out = max(_in_out(m)[1] for _, m in targets)
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    adapter = config.adapter_name
    persistent = config.save_projection
    device = targets[0][1].weight.device
    sorf_A = BufferDict({adapter: kaiming_uniform((config.r, max_in), generator).to(device)}, persistent=persistent)
    sorf_B = BufferDict({adapter: kaiming_uniform((max_out, config.r), generator).to(device)}, persistent=persistent)
    mixers: dict[int, BufferDict] = {}
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in targets:
        d_out = _in_out(module)[1]
        if d_out not in mixers:
            mixer = sorf_matrix(d_out, config.sorf_seed).to(device)
            mixers[d_out] = BufferDict({adapter: mixer}, persistent=persistent)
        layer = SORFVeRALinear(
            module, sorf_A, sorf_B, mixers[d_out], adapter, config.r, config.d_initial, config.train_b, config.dropout
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    for name, module in model.named_modules():
        if config.modules_to_save and name and _matches(name, config.modules_to_save):
            module.requires_grad_(True)
    return model


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def sorf_vera_layers(network: nn.Module, adapter_name: str = "default") -> list[SORFVeRALayer]:
    """The SORF-VeRA layers of ``network`` as layout records, keys relative to ``network.state_dict()``
    (the frozen projections are views of the shared buffers, sliced as the forward slices them)."""
    out: list[SORFVeRALayer] = []
    for name, module in network.named_modules():
        if not isinstance(module, SORFVeRALinear) or adapter_name not in module.sorf_d_scale:
            continue
        out.append(
            SORFVeRALayer(
                name=name,
                base_key=_join(name, "base_layer.weight"),
                b_real_key=_join(name, f"sorf_b_real.{adapter_name}"),
                b_imag_key=_join(name, f"sorf_b_imag.{adapter_name}"),
                d_scale_key=_join(name, f"sorf_d_scale.{adapter_name}"),
                d_angles_key=_join(name, f"sorf_d_angles.{adapter_name}"),
                proj_a=module.sorf_A[adapter_name][:, : module.in_features].detach(),
                proj_b=module.sorf_B[adapter_name][: module.out_features, :].detach(),
                sorf=module.sorf_S[adapter_name].detach(),
                fan_in_fan_out=module.fan_in_fan_out,
            )
        )
    return out
