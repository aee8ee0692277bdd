"""Math and bookkeeping shared by the LoRA aggregation rules.

Conventions (PEFT): A = ``lora_A`` (r x d_in), B = ``lora_B`` (d_out x r), scaling s, and the
layer's update delta W = s B A in ``nn.Linear`` layout (d_out x d_in); a base weight is written
only through :func:`~fedmoe.algorithms.lora.layout.to_base_layout`. Client weights p_i are
normalised to sum 1. Means accumulate in float32 (or wider) and are cast back to the tensor's dtype.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.errors import FedMoEError

StateDict = dict[str, torch.Tensor]


def normalise(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum 1 (sample counts in, p_i out)."""
    total = float(sum(weights))
    if not weights or not total > 0 or any(w < 0 for w in weights):
        raise FedMoEError(f"client weights must be non-negative with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of a tensor: float32 or wider."""
    return torch.promote_types(t.dtype, torch.float32)


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i weights[i] * tensors[i], accumulated in float32 or wider, in the first tensor's dtype."""
    ref = tensors[0]
    out = torch.zeros(ref.shape, dtype=acc_dtype(ref), device=ref.device)
    for t, w in zip(tensors, weights):
        if w != 0.0:
            out.add_(t.to(out.dtype), alpha=float(w))
    return out.to(ref.dtype)


def mean_of_keys(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], keys: Iterable[str]
) -> StateDict:
    """The weighted mean of each key over the states (weights already normalised)."""
    return {k: weighted_mean([s[k] for s in states], weights) for k in keys}


def adapter_keys(layers: Sequence[LoRALayer]) -> set[str]:
    """Every ``lora_A`` and ``lora_B`` key of the layers."""
    return {k for layer in layers for k in (layer.a_key, layer.b_key)}


def lora_layers(layers: Sequence[object], rule: str) -> list[LoRALayer]:
    """The layers as LoRA records; a model without LoRA adapters is a configuration error."""
    lora = [layer for layer in layers if isinstance(layer, LoRALayer)]
    if not lora or len(lora) != len(layers):
        kinds = sorted({type(layer).__name__ for layer in layers}) or ["none"]
        raise FedMoEError(
            f"rule {rule!r} aggregates LoRA adapters, but the model's adapted layers are {', '.join(kinds)}: "
            "set model.adapter.type to lora (or pick a rule for that adapter type)"
        )
    return lora


def check_uploads(
    states: Sequence[Mapping[str, torch.Tensor]],
    keys: Iterable[str],
    rule: str,
    client_ids: Sequence[int] | None = None,
    equal_shapes: bool = True,
) -> None:
    """Every client uploaded each of ``keys``, with one shape per key across clients.

    Raises a one-line FedMoEError naming the client, the key and what differs.
    """
    ids = list(client_ids) if client_ids is not None else list(range(len(states)))
    keys = sorted(keys)
    if not states:
        raise FedMoEError(f"rule {rule!r}: no client results to aggregate")
    for cid, state in zip(ids, states):
        missing = [k for k in keys if k not in state]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FedMoEError(
                f"rule {rule!r}: {_who(cid)}'s upload lacks {missing[0]!r}{more}; every client must "
                "send the same adapter keys (same model.adapter config on every client)"
            )
    if not equal_shapes:
        return
    first = states[0]
    for cid, state in zip(ids[1:], states[1:]):
        for k in keys:
            if state[k].shape != first[k].shape:
                what = "ranks differ" if ("lora_A" in k or "lora_B" in k) else "shapes differ"
                raise FedMoEError(
                    f"rule {rule!r}: {k!r} has shape {tuple(state[k].shape)} on {_who(cid)} but "
                    f"{tuple(first[k].shape)} on {_who(ids[0])} ({what}); {rule} needs equal adapter "
                    "shapes on every client (use flora or hetlora for heterogeneous ranks)"
                )


def _who(client_id: object) -> str:
    return f"client {client_id}" if isinstance(client_id, int) else str(client_id)


def residual_factors(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], p: Sequence[float], a_bar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors U (d_out x (m-1)r), V ((m-1)r x d_in) with U V = sum_i p_i B_i A_i - B_bar A_bar.

    sum_i p_i B_i A_i - B_bar A_bar = sum_i p_i (B_i - c)(A_i - A_bar) for any c, because
    sum_i p_i (A_i - A_bar) = 0; with c = B_m the last client's term vanishes, so the residual has
    rank <= (m-1) r and no client's B_i A_i is ever formed. Accumulates in float32 or wider.
    """
    dt = acc_dtype(bs[0])
    if len(bs) == 1:
        return bs[0].new_zeros((bs[0].shape[0], 0), dtype=dt), as_[0].new_zeros((0, as_[0].shape[1]), dtype=dt)
    m1, (d_out, r), d_in = len(bs) - 1, bs[0].shape, as_[0].shape[1]
    w = torch.tensor(p[:-1], dtype=dt, device=bs[0].device).view(m1, 1, 1)
    u = (torch.stack(bs[:-1]).to(dt) - bs[-1].to(dt)).mul_(w)  # m-1 x d_out x r
    v = torch.stack(as_[:-1]).to(dt) - a_bar.to(dt)  # m-1 x r x d_in
    return u.permute(1, 0, 2).reshape(d_out, m1 * r), v.reshape(m1 * r, d_in)


def fold(
    base: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float, fan_in_fan_out: bool, inplace: bool = False
) -> torch.Tensor:
    """base + to_base_layout(scale * U V, fan_in_fan_out), in one matmul, in the base's dtype
    (for ``fan_in_fan_out``, (U V)^T is computed as V^T U^T: no transposed copy).

    ``inplace`` adds into ``base`` itself (no copy of the base weight).
    """
    if u.shape[1] == 0:
        return base if inplace else base.clone()
    left, right = (v.T, u.T) if fan_in_fan_out else (u, v)
    if (left.shape[0], right.shape[1]) != tuple(base.shape):
        raise FedMoEError(
            f"a residual of shape {(u.shape[0], v.shape[1])} does not fit base weight {tuple(base.shape)} "
            f"(fan_in_fan_out={fan_in_fan_out}): the layer record's fan_in_fan_out is wrong"
        )
    if base.dtype == left.dtype:
        if inplace:
            return base.addmm_(left, right, alpha=scale)
        return torch.addmm(base, left, right, alpha=scale)
    out = torch.addmm(base.to(left.dtype), left, right, alpha=scale).to(base.dtype)
    if inplace:
        return base.copy_(out)
    return out


def factor_bytes(rank: int, d_out: int, d_in: int, element_size: int) -> tuple[int, bool]:
    """Bytes of a rank-``rank`` d_out x d_in update on the wire and whether it goes as factors.

    Factors cost rank (d_out + d_in) elements, the dense matrix d_out d_in; the smaller is sent
    (dense on a tie). Rank 0 costs nothing.
    """
    low = rank * (d_out + d_in)
    dense = d_out * d_in
    if rank == 0:
        return 0, True
    return (low * element_size, True) if low < dense else (dense * element_size, False)


def layer_dims(layer: LoRALayer, state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(d_out, d_in) of a layer, from its adapter shapes."""
    return int(state[layer.b_key].shape[0]), int(state[layer.a_key].shape[1])


class BaseHistory:
    """Which base corrections each client still needs, as plain data in the server state.

    Rules that fold updates into the frozen base weights (FedEx-LoRA's residual, FLoRA's merge) send
    a client every correction made since it last received the base: per layer, the sum of their
    ranks as factors, or the dense difference when that is smaller. ``versions`` lists, per
    aggregation, each layer's correction rank; ``seen`` maps a client id to the number of
    aggregations its base already includes (0: the common initial base, which never travels).
    """

    @staticmethod
    def new() -> dict:
        return {"versions": [], "seen": {}}

    @staticmethod
    def wire_bytes(
        history: Mapping, client_id: int, layers: Sequence[LoRALayer], state: Mapping[str, torch.Tensor]
    ) -> int:
        since = int(history["seen"].get(client_id, 0))
        pending = history["versions"][since:]
        total = 0
        for layer in layers:
            rank = sum(int(v.get(layer.name, 0)) for v in pending)
            d_out, d_in = layer_dims(layer, state)
            total += factor_bytes(rank, d_out, d_in, state[layer.base_key].element_size())[0]
        return total

    @staticmethod
    def advance(history: Mapping, ranks: Mapping[str, int], client_ids: Iterable[int]) -> dict:
        """The history after one more aggregation; ``client_ids`` held the base before it."""
        before = len(history["versions"])
        seen = dict(history["seen"])
        for cid in client_ids:
            seen[int(cid)] = before
        return {"versions": [*history["versions"], dict(ranks)], "seen": seen}


def check_factor_shapes(
    states: Sequence[Mapping[str, torch.Tensor]],
    layers: Sequence[LoRALayer],
    global_state: Mapping[str, torch.Tensor],
    rule: str,
    client_ids: Sequence[int] | None = None,
) -> None:
    """Each client's A_i (r_i x d_in) and B_i (d_out x r_i) fit the layer, ranks free to differ."""
    ids = list(client_ids) if client_ids is not None else list(range(len(states)))
    for cid, state in zip(ids, states):
        for layer in layers:
            a, b = state[layer.a_key], state[layer.b_key]
            d_out, d_in = layer_dims(layer, global_state)
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                raise FedMoEError(
                    f"rule {rule!r}: {_who(cid)}'s adapter of layer {layer.name!r} has A {tuple(a.shape)} and "
                    f"B {tuple(b.shape)}; expected A (r, {d_in}) and B ({d_out}, r) with the same r"
                )


def mixed_rank_start(
    global_state: Mapping[str, torch.Tensor],
    client_states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    layers: Sequence[LoRALayer],
    client_ids: Sequence[int] | None,
    rule: str,
) -> tuple[list[float], StateDict]:
    """The common start of the rules whose clients' ranks may differ (FLoRA, HetLoRA): checks the
    uploads (the head with equal shapes, the adapters with free ranks), and returns the normalised
    weights p and a new state with the head FedAvg'd."""
    p = normalise(weights)
    ids = list(client_ids) if client_ids is not None else list(range(len(client_states)))
    bases = {layer.base_key for layer in layers}
    adapters = adapter_keys(layers)
    head = [k for k in global_state if k not in bases and k not in adapters]
    check_uploads(client_states, head, rule, ids)
    check_uploads(client_states, adapters, rule, ids, equal_shapes=False)
    check_factor_shapes(client_states, layers, global_state, rule, ids)
    new = dict(global_state)
    new.update(mean_of_keys(client_states, p, head))
    return p, new
