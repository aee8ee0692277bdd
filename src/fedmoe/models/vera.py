"""Where a PEFT VeRA model keeps its adapters: layout records for the aggregation rules."""

from __future__ import annotations

from torch import nn

from fedmoe.algorithms.lora.layout import VeRALayer


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def vera_layers(network: nn.Module, adapter_name: str = "default") -> list[VeRALayer]:
    """The PEFT VeRA layers of ``network`` (``peft.tuners.vera.layer.Linear``), keys relative to
    ``network.state_dict()``.

    The shared projections are sliced as PEFT's forward slices them (``vera_A[:, :in_features]``,
    ``vera_B[:out_features, :]``); the records hold views, not copies.
    """
    from peft.tuners.vera.layer import VeraLayer

    out: list[VeRALayer] = []
    for name, module in network.named_modules():
        if not isinstance(module, VeraLayer) or adapter_name not in module.vera_lambda_b:
            continue
        out.append(
            VeRALayer(
                name=name,
                base_key=_join(name, "base_layer.weight"),
                lambda_b_key=_join(name, f"vera_lambda_b.{adapter_name}"),
                lambda_d_key=_join(name, f"vera_lambda_d.{adapter_name}"),
                proj_a=module.vera_A[adapter_name][:, : module.in_features].detach(),
                proj_b=module.vera_B[adapter_name][: module.out_features, :].detach(),
                fan_in_fan_out=bool(module.fan_in_fan_out),
            )
        )
    return out
