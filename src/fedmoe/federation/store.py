"""Client state between rounds.

Only clients that have been sampled are materialised: a client never sampled holds the common
initial weights, which are stored once. States are kept losslessly on the CPU; ``dtype`` (fp16 or
bf16) stores floating tensors at lower precision only when asked.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from fedmoe.algorithms.fusion import is_mixable

StateDict = dict[str, torch.Tensor]
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class ClientStore:
    """Per-client weights and optimizer states.

    Args:
        dtype: ``None`` (lossless) or ``float16`` / ``bfloat16`` for floating tensors.
    """

    def __init__(self, dtype: Literal["float16", "bfloat16"] | None = None) -> None:
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r}")
        self.dtype = dtype
        self.weights: dict[int, StateDict] = {}
        self.optimizers: dict[int, dict] = {}

    def get_weights(self, client_id: int) -> StateDict | None:
        """The client's stored weights (in their original dtypes), or None if never stored."""
        w = self.weights.get(client_id)
        if w is None or self.dtype is None:
            return w
        return {k: v.float() if is_mixable(v) else v for k, v in w.items()}

    def put_weights(self, client_id: int, weights: StateDict) -> None:
        dt = _DTYPES.get(self.dtype) if self.dtype else None
        self.weights[client_id] = {
            k: (v.detach().to("cpu", dt) if dt is not None and is_mixable(v) else v.detach().cpu())
            for k, v in weights.items()
        }

    def get_optimizer(self, client_id: int) -> dict | None:
        return self.optimizers.get(client_id)

    def put_optimizer(self, client_id: int, state: dict | None) -> None:
        if state is not None:
            self.optimizers[client_id] = _to_cpu(state)

    def state_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "weights": self.weights, "optimizers": self.optimizers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dtype = state["dtype"]
        self.weights = state["weights"]
        self.optimizers = state["optimizers"]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
