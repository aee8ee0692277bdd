"""Weighted combinations of state dicts.

Only floating-point tensors are combined. Integer and boolean tensors (BatchNorm's
``num_batches_tracked``, masks) keep the value of the model being updated: arithmetic on them is
meaningless and would silently change their dtype.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def is_mixable(t: torch.Tensor) -> bool:
    """Whether a tensor takes part in weighted averages (floating point or complex)."""
    return t.is_floating_point() or t.is_complex()


def mix(
    base: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    base_weight: float,
) -> StateDict:
    """``base_weight * base + sum_i weights[i] * states[i]`` for floating tensors; the rest from ``base``.

    Accumulates in float32 (or wider) and casts back to the base tensor's dtype. Returns new tensors;
    the inputs are not modified.
    """
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    for s in states:
        if s.keys() != base.keys():
            missing = sorted(set(base) ^ set(s))[:5]
            raise KeyError(f"state dicts have different keys, e.g. {missing}")
    keys = [k for k, v in base.items() if is_mixable(v)]
    out: StateDict = {k: v.detach().clone() for k, v in base.items() if not is_mixable(v)}
    if not keys:
        return out

    def acc_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.promote_types(t.dtype, torch.float32)

    if base_weight == 0.0:  # start from zeros, so a non-finite base cannot leak into the result
        acc = [torch.zeros_like(base[k], dtype=acc_dtype(base[k])) for k in keys]
    else:
        acc = [base[k].detach().to(acc_dtype(base[k])) * base_weight for k in keys]
    for s, w in zip(states, weights):
        if w == 0.0:
            continue
        torch._foreach_add_(acc, [s[k].detach().to(a.device, a.dtype) for k, a in zip(keys, acc)], alpha=float(w))
    for k, a in zip(keys, acc):
        out[k] = a.to(base[k].dtype)
    return {k: out[k] for k in base}


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    base: Mapping[str, torch.Tensor] | None = None,
) -> StateDict:
    """Weighted mean of floating tensors, weights normalised to sum 1.

    Non-floating tensors come from ``base`` (the model being updated), or from the first state.
    """
    if not states:
        raise ValueError("cannot average zero state dicts")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must have a positive sum, got {list(weights)}")
    ref = states[0] if base is None else base
    return mix(ref, states, [float(w) / total for w in weights], base_weight=0.0)


def num_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state dict on the wire: elements x element size of every tensor."""
    return sum(t.numel() * t.element_size() for t in state.values())


def all_finite(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every floating tensor of a state dict is finite.

    A sum in the tensor's own dtype is finite only if every element is (an infinity or NaN
    propagates), so a finite one settles it in one fast pass; a non-finite one may be an overflow of
    large finite values, and is settled by a float64 sum, non-finite exactly when some element is
    (float32 values cannot overflow it). Neither allocates a mask.
    """
    return all(_finite(t) for t in state.values() if is_mixable(t) and t.numel())


def _finite(t: torch.Tensor) -> bool:
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.complex128 if t.is_complex() else torch.float64)))
