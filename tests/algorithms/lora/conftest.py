"""Hand-built adapter states for the aggregation-rule tests, and a tiny PEFT model reader.

``kit`` builds a global state with adapted layers in both layouts (non-square ``nn.Linear``,
d_out x d_in; GPT-2 ``Conv1D``, stored d_in x d_out), clients derived from it, and the effective
weights W + s B A in the base layout, so each test checks a rule against the definition.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedmoe.algorithms.base import ClientResult
from fedmoe.algorithms.lora.layout import LoRALayer, to_base_layout

HEAD_W, HEAD_B = "head.weight", "head.bias"


def make_layers(r: int = 3, alpha: float = 6.0, rslora: bool = False) -> list[LoRALayer]:
    """A non-square Linear (7 -> 5) and a non-square Conv1D (6 -> 4)."""
    s = alpha / math.sqrt(r) if rslora else alpha / r
    return [
        LoRALayer("lin", "lin.base_layer.weight", "lin.lora_A.default.weight", "lin.lora_B.default.weight", s, False),
        LoRALayer("c1d", "c1d.base_layer.weight", "c1d.lora_A.default.weight", "c1d.lora_B.default.weight", s, True),
    ]


DIMS = {"lin": (5, 7), "c1d": (4, 6)}  # (d_out, d_in)


def make_global(layers: list[LoRALayer], r: int = 3, seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for layer in layers:
        d_out, d_in = DIMS[layer.name]
        base_shape = (d_in, d_out) if layer.fan_in_fan_out else (d_out, d_in)
        state[layer.base_key] = torch.randn(base_shape, generator=g, dtype=dtype)
        state[layer.a_key] = torch.randn(r, d_in, generator=g, dtype=dtype)
        state[layer.b_key] = torch.randn(d_out, r, generator=g, dtype=dtype)
    state[HEAD_W] = torch.randn(3, 5, generator=g, dtype=dtype)
    state[HEAD_B] = torch.randn(3, generator=g, dtype=dtype)
    return state


def make_clients(
    global_state: dict[str, torch.Tensor],
    layers: list[LoRALayer],
    m: int = 3,
    seed: int = 1,
    train_a: bool = True,
    ranks: list[int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Uploads (adapters and head, no base) that differ from the global one; ``ranks`` cuts client
    i's adapters to ``ranks[i]`` ranks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(m):
        st = {}
        for layer in layers:
            a, b = global_state[layer.a_key], global_state[layer.b_key]
            st[layer.a_key] = a + torch.randn(a.shape, generator=g, dtype=a.dtype) if train_a else a.clone()
            st[layer.b_key] = b + torch.randn(b.shape, generator=g, dtype=b.dtype)
            if ranks is not None:
                st[layer.a_key], st[layer.b_key] = st[layer.a_key][: ranks[i]], st[layer.b_key][:, : ranks[i]]
        for k in (HEAD_W, HEAD_B):
            st[k] = global_state[k] + torch.randn(global_state[k].shape, generator=g, dtype=global_state[k].dtype)
        out.append(st)
    return out


def effective(state: dict[str, torch.Tensor], layer: LoRALayer, base: torch.Tensor | None = None, scaling: float | None = None) -> torch.Tensor:
    """W + s B A in the base weight's layout (``base`` overrides the state's W)."""
    w = state[layer.base_key] if base is None else base
    s = layer.scaling if scaling is None else scaling
    return w + to_base_layout(s * state[layer.b_key] @ state[layer.a_key], layer.fan_in_fan_out)


def layer_output(weight: torch.Tensor, layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    """The adapted layer's output for effective weight ``weight`` (Conv1D: x @ W; Linear: x @ W^T)."""
    return x @ weight if layer.fan_in_fan_out else x @ weight.T


def results(states: list[dict[str, torch.Tensor]], samples: list[int]) -> list[ClientResult]:
    return [ClientResult(client_id=i, num_samples=n, weights=s) for i, (s, n) in enumerate(zip(states, samples))]


class FakeContext:
    """The two ServerContext hooks the rules use at setup, plus a network loader."""

    def __init__(self, layers, template, trainable, net: nn.Module | None = None) -> None:
        self._layers, self._template, self._trainable, self.net = layers, template, trainable, net
        self.loaded: dict[str, torch.Tensor] | None = None

    def adapted_layers(self):
        return self._layers

    def trainable_keys(self):
        return set(self._trainable)

    def client_template(self):
        return self._template

    def load_network(self, weights):
        self.loaded = weights
        if self.net is not None:
            self.net.load_state_dict(weights, strict=False)
        return self.net


def peft_layers(model: nn.Module) -> list[LoRALayer]:
    """The LoRA layers of a PEFT model, read from its modules (keys of ``model.state_dict()``)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out.append(
                LoRALayer(
                    name, f"{name}.base_layer.weight", f"{name}.lora_A.default.weight",
                    f"{name}.lora_B.default.weight", float(module.scaling["default"]), bool(module.fan_in_fan_out),
                )
            )
    return out


@pytest.fixture
def kit() -> SimpleNamespace:
    return SimpleNamespace(
        make_layers=make_layers, make_global=make_global, make_clients=make_clients, effective=effective,
        layer_output=layer_output, results=results, FakeContext=FakeContext, peft_layers=peft_layers,
        HEAD=(HEAD_W, HEAD_B), DIMS=DIMS,
    )
