"""Row-gathered mixed-adapter LoRA: one adapter per batch row in two batched matmuls per layer.

PEFT's mixed batch (``adapter_names``) loops, in every LoRA layer, over the batch's unique adapters
(select the rows, two small matmuls, scale, add back): about six small ops per adapter per layer per
token. Serving systems (Punica's BGMV, S-LoRA) gather instead: for a batch whose row i is served by
adapter a_i, the factors are stacked per row ONCE (:func:`stack_rows`),

    A_rows[i] = A_{a_i}^T (d_in x r),   B_rows[i] = (s_{a_i} B_{a_i})^T (r x d_out),

and every forward of the layer is

    out = base(x) + bmm(bmm(x, A_rows), B_rows),   x: (batch, ..., d_in),

two batched matmuls whatever the number of adapters. Adapters of different ranks are zero-padded to
the largest (exact: the padded columns of A_rows meet zero rows of B_rows). A row may name several
adapters (e.g. an expert's LoRA ``e`` and its correction ``e__corr``): their factors are concatenated
along the rank, [A_1; A_2] and [s_1 B_1, s_2 B_2], so the row gets the sum of their deltas.

:func:`gathered_adapters` installs this forward on every PEFT LoRA layer for a block and restores
the layers' own forwards after it, however the block ends. The adapters stay in PEFT's modules
(save/load unchanged); the stacks are detached copies, so the block is for inference (dropout
inactive), and a change to the adapters inside the block is not seen until it is entered again.
Only plain LoRA on linear layers (``lora.Linear``, ``fan_in_fan_out`` included: its LoRA factors are
``nn.Linear`` either way) is gathered; other layer kinds, variants (DoRA, ...), LoRA biases and
merged adapters are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.errors import ConfigError, DataError

#: The row name of the base alone (PEFT's ``adapter_names`` spelling).
BASE = "__base__"
RowAdapters = str | Sequence[str]
Stacks = dict[str, tuple[torch.Tensor, torch.Tensor] | None]


def _row_names(adapter_per_row: Sequence[RowAdapters]) -> list[tuple[str, ...]]:
    rows = [(a,) if isinstance(a, str) else tuple(a) for a in adapter_per_row]
    if not rows:
        raise ConfigError("gathered adapters need at least one row; give one adapter name per batch row")
    return rows


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT LoRA layer of the model, by module name, in module order."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _check_layer(name: str, module: nn.Module, adapters: Sequence[str]) -> None:
    from peft.tuners.lora import Linear

    if not isinstance(module, Linear):
        raise ConfigError(
            f"LoRA layer {name} is a {type(module).__name__}, not a linear layer; gathered adapters serve "
            f"LoRA on linear layers only (use PEFT's adapter_names for {adapters[0]!r})"
        )
    if module.merged:
        raise ConfigError(f"LoRA layer {name} has merged adapters {module.merged_adapters}; unmerge them first")
    for a in adapters:
        if a in module.lora_variant:
            raise ConfigError(
                f"adapter {a!r} at {name} is a LoRA variant ({type(module.lora_variant[a]).__name__}); gathered "
                "adapters serve plain LoRA only (use PEFT's adapter_names)"
            )
        if module.lora_B[a].bias is not None:
            raise ConfigError(f"adapter {a!r} at {name} has a LoRA bias (lora_bias=True); gathered adapters serve plain LoRA only")


def stack_rows(peft_model: nn.Module, adapter_per_row: Sequence[RowAdapters]) -> Stacks:
    """Per LoRA layer name, ``(A_rows, B_rows)``: (batch, d_in, r) and (batch, r, d_out) in the
    adapters' dtype, row i the (concatenated) factors of ``adapter_per_row[i]`` with the scaling
    folded into B, zero-padded to the largest rank r; None for a layer none of the rows' adapters
    adapts. A row's adapter missing from a layer contributes nothing there (as in PEFT), a row
    :data:`BASE` nowhere; a name missing from every layer is refused."""
    return _stack(lora_layers(peft_model), _row_names(adapter_per_row))


def _stack(layers: dict[str, nn.Module], rows: list[tuple[str, ...]]) -> Stacks:
    wanted = list(dict.fromkeys(a for r in rows for a in r))
    known = {a for m in layers.values() for a in m.lora_A}
    unknown = [a for a in wanted if a not in known and a != BASE]
    if unknown:
        raise DataError(
            f"adapter {unknown[0]!r} is not in any LoRA layer of the model; adapters: {', '.join(sorted(known)) or 'none'}"
        )
    out: Stacks = {}
    with torch.no_grad():
        for name, module in layers.items():
            present = [a for a in wanted if a in module.lora_A]
            if not present:
                out[name] = None
                continue
            _check_layer(name, module, present)
            per_key = {key: _factors(module, key) for key in dict.fromkeys(rows)}
            rank = max(f[0].shape[0] for f in per_key.values() if f is not None)
            a0, b0 = module.lora_A[present[0]].weight, module.lora_B[present[0]].weight
            for key, f in per_key.items():
                if f is None:  # the base alone in this layer
                    per_key[key] = (a0.new_zeros(rank, a0.shape[1]), b0.new_zeros(b0.shape[0], rank))
                elif f[0].shape[0] < rank:  # zero rows of A, zero columns of B
                    pad = rank - f[0].shape[0]
                    per_key[key] = (F.pad(f[0], (0, 0, 0, pad)), F.pad(f[1], (0, pad)))
            a_rows = torch.stack([per_key[key][0] for key in rows]).transpose(1, 2).contiguous()
            b_rows = torch.stack([per_key[key][1] for key in rows]).transpose(1, 2).contiguous()
            out[name] = (a_rows, b_rows)
    return out


def _factors(module: nn.Module, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, s B) of the adapters ``names`` of one layer, concatenated along the rank (their deltas
    add); None when none of them adapts the layer."""
    names = [a for a in names if a in module.lora_A]
    if not names:
        return None
    a = [module.lora_A[n].weight for n in names]
    b = [module.lora_B[n].weight if module.scaling[n] == 1 else module.lora_B[n].weight * module.scaling[n] for n in names]
    return (a[0], b[0]) if len(names) == 1 else (torch.cat(a), torch.cat(b, dim=1))


def _gathered_forward(name: str, module: nn.Module, stacks: tuple[torch.Tensor, torch.Tensor] | None, rows: int,
                      adapters: Sequence[str]):
    """The forward of one LoRA layer inside :func:`gathered_adapters`: its base layer plus the
    rows' gathered delta (the base alone when no row's adapter adapts it or adapters are disabled)."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    dropouts = [d for a in adapters if isinstance(d := module.lora_dropout[a], nn.Dropout) and d.p > 0]

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ConfigError(f"a forward passed adapter_names while gathered adapters serve {name}; use one or the other")
        for k in VARIANT_KWARG_KEYS:
            kwargs.pop(k, None)
        result = module.base_layer(x, *args, **kwargs)
        if stacks is None or module.disable_adapters:
            return result
        if x.shape[0] != rows:
            raise DataError(
                f"gathered adapters at {name} were stacked for {rows} rows but a forward has batch size {x.shape[0]}; "
                "give one adapter per row of this batch (beams and return sequences multiply the rows)"
            )
        if dropouts and module.training:
            raise ConfigError(f"LoRA layer {name} is in training mode with dropout; call model.eval() before serving gathered adapters")
        a_rows, b_rows = stacks
        h = x.reshape(rows, -1, x.shape[-1]).to(a_rows.dtype)
        if result.dtype == a_rows.dtype:
            return torch.baddbmm(result.reshape(rows, -1, result.shape[-1]), torch.bmm(h, a_rows), b_rows).view(result.shape)
        return result + torch.bmm(torch.bmm(h, a_rows), b_rows).view(result.shape).to(result.dtype)

    return forward


@contextmanager
def gathered_adapters(peft_model: nn.Module, adapter_per_row: Sequence[RowAdapters]) -> Iterator[Stacks]:
    """Serve row i of every forward in the block with ``adapter_per_row[i]`` (an adapter name, or
    several whose deltas add), through the gathered forward (module docstring) on every LoRA layer
    of ``peft_model``; PEFT's active adapters (and any patched forward, such as a per-token gate)
    are bypassed in the block and restored after it, also when it raises. Yields the stacks
    (:func:`stack_rows`). A forward whose batch size is not ``len(adapter_per_row)`` raises
    :class:`~fedmoe.errors.DataError`."""
    rows = _row_names(adapter_per_row)
    layers = lora_layers(peft_model)
    stacks = _stack(layers, rows)
    wanted = list(dict.fromkeys(a for r in rows for a in r))
    saved = {n: vars(m).get("forward") for n, m in layers.items()}
    try:
        for n, m in layers.items():
            m.forward = _gathered_forward(n, m, stacks[n], len(rows), [a for a in wanted if a in m.lora_A])
        yield stacks
    finally:
        for n, m in layers.items():
            if saved[n] is None:
                vars(m).pop("forward", None)
            else:
                m.forward = saved[n]
