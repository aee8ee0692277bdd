"""Where the adapters of a PEFT model live in its state dict, as the aggregation rules see them.

The rules are pure functions over state dicts; they learn each adapted layer's keys, scaling and
weight layout from these records, which :func:`fedmoe.models.lora.adapted_layers` reads from a
PEFT model (``layer.scaling[adapter]`` honours rank_pattern, alpha_pattern and rsLoRA) and tests
write by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRALayer:
    """One LoRA-adapted layer: delta W = scaling * B @ A in ``nn.Linear`` layout (d_out x d_in).

    Attributes:
        name: module path of the adapted layer (for messages).
        base_key: state-dict key of the frozen base weight (``...base_layer.weight``); stored
            transposed (d_in x d_out) when ``fan_in_fan_out`` (GPT-2's ``Conv1D``).
        a_key: key of ``lora_A`` (r x d_in).
        b_key: key of ``lora_B`` (d_out x r).
        scaling: s = alpha / r (alpha / sqrt(r) with rsLoRA).
        fan_in_fan_out: whether the base weight is stored as d_in x d_out.
    """

    name: str
    base_key: str
    a_key: str
    b_key: str
    scaling: float
    fan_in_fan_out: bool = False


@dataclass(frozen=True)
class VeRALayer:
    """One VeRA-adapted layer: delta W = diag(lambda_b) B_s diag(lambda_d) A_s (``nn.Linear`` layout).

    ``A_s`` (r x d_in) and ``B_s`` (d_out x r) are the frozen shared projections, already sliced to
    this layer's shape; only the vectors travel.
    """

    name: str
    base_key: str
    lambda_b_key: str
    lambda_d_key: str
    proj_a: torch.Tensor
    proj_b: torch.Tensor
    fan_in_fan_out: bool = False


def to_base_layout(delta: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """A d_out x d_in update in the base weight's storage layout (``peft.utils.transpose``)."""
    return delta.T if fan_in_fan_out else delta


@dataclass(frozen=True)
class SORFVeRALayer:
    """One SORF-VeRA-adapted layer: delta W = S Gamma(b) B_s Lambda_d A_s (``nn.Linear`` layout).

    ``S`` (d_out x d_out) is the frozen structured-orthogonal mixer, ``A_s`` (r x d_in) and ``B_s``
    (d_out x r) the frozen shared projections (sliced to this layer), ``Gamma(b)`` the block-diagonal
    matrix of 2x2 complex-multiplication blocks [[a_j, -c_j], [c_j, a_j]] from ``b_real`` = a and
    ``b_imag`` = c (d_out / 2 each), and ``Lambda_d = d_scale * G(d_angles)`` a scaled rotation built
    from r (r - 1) / 2 Givens angles (:mod:`fedmoe.algorithms.lora.sorf_vera`).
    """

    name: str
    base_key: str
    b_real_key: str
    b_imag_key: str
    d_scale_key: str
    d_angles_key: str
    proj_a: torch.Tensor
    proj_b: torch.Tensor
    sorf: torch.Tensor
    fan_in_fan_out: bool = False
