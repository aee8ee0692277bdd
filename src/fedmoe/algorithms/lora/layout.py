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
