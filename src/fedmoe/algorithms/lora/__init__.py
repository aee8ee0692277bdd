"""Federated LoRA: aggregation rules over adapter tensors (one module per rule), by name.

``get_rule("fedex")`` gives the registered :class:`~fedmoe.algorithms.base.Algorithm` class; each
rule's math is also a pure function (``fedit_aggregate``, ``fedex_aggregate``, ...).
"""

from fedmoe.algorithms.lora.rules import RULES, LoRARule, get_rule, register_rule
from fedmoe.algorithms.lora.fedit import FedIT, fedit_aggregate
from fedmoe.algorithms.lora.fedex import FedExLoRA, fedex_aggregate
from fedmoe.algorithms.lora.ffa import FFALoRA, ffa_aggregate
from fedmoe.algorithms.lora.fedsa import FedSALoRA, fedsa_aggregate
from fedmoe.algorithms.lora.flora import FLoRA, flora_aggregate, fresh_lora_a
from fedmoe.algorithms.lora.hetlora import HetLoRA, TailPenalty, hetlora_aggregate, prune_decision, tail_norm
from fedmoe.algorithms.lora import sorf_vera, vera  # noqa: F401  (register fedex_vera, sorf_vera)

__all__ = [
    "RULES",
    "FFALoRA",
    "FLoRA",
    "FedExLoRA",
    "FedIT",
    "FedSALoRA",
    "HetLoRA",
    "LoRARule",
    "TailPenalty",
    "fedex_aggregate",
    "fedit_aggregate",
    "fedsa_aggregate",
    "ffa_aggregate",
    "flora_aggregate",
    "fresh_lora_a",
    "get_rule",
    "hetlora_aggregate",
    "prune_decision",
    "register_rule",
    "tail_norm",
]
