"""Asynchronous aggregation: staleness functions, FedAsync mixing and FedBuff, exact for LoRA.

FedAsync (Xie et al., 2019): an update x_new trained from version tau arrives at version t and is
mixed into the server model, x <- (1 - w) x + w x_new with w = mix * s(t - tau). FedBuff (Nguyen et
al., AISTATS 2022): K deltas Delta_i = x_i - x_{tau_i} are buffered and applied together,
x <- x + eta_g / K * sum_i s(t - tau_i) Delta_i.

Staleness functions s(d), d >= 0 (FedAsync's section 5.2): constant 1; polynomial (d + 1)^(-a);
hinge 1 if d <= b else 1 / (h (d - b) + 1). The reference simulation's 1 / (1 + 0.1 d) is the
hinge with b = 0, h = 0.1 (preset ``reference``).

LoRA adapters (delta W = s B A, PEFT layout, :mod:`fedmoe.algorithms.lora`) are not mixed exactly by
mixing their factors: with B+ = (1 - w) B + w B' and A+ = (1 - w) A + w A',

    (1 - w) s B A + w s B' A' - s B+ A+ = s w (1 - w) (B - B')(A - A'),

a residual of rank <= r. :func:`fedasync_lora` returns it as factors (U, V) per layer, U V being the
residual in ``nn.Linear`` layout (d_out x d_in, the scaling folded into U); adding it to a frozen
correction beside the adapter makes the mix exact. For FedBuff the target delta is
T = sum_i c_i s (B_i A_i - B_{tau_i} A_{tau_i}) (c_i = eta_g s(d_i) / K) and the residual
R = s B A + T - s B+ A+, again as factors. :func:`compress_factors` re-compresses factors to a
rank budget by truncated SVD of their QR-reduced core, reporting the energy dropped. Everything
here is pure: no I/O, inputs never modified.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch

from fedmoe.algorithms.fusion import is_mixable, mix
from fedmoe.algorithms.lora.common import acc_dtype
from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.errors import ConfigError

StateDict = dict[str, torch.Tensor]
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per layer name, (U: d_out x k, V: k x d_in) with U V the layer's matrix (``nn.Linear`` layout)."""

STALENESS_KINDS = ("constant", "polynomial", "hinge")


def constant(d: int) -> float:
    """s(d) = 1."""
    return 1.0


def polynomial(d: int, a: float = 0.5) -> float:
    """s(d) = (d + 1)^(-a)."""
    return float((d + 1) ** (-a))


def hinge(d: int, b: int = 4, h: float = 1.0) -> float:
    """s(d) = 1 if d <= b else 1 / (h (d - b) + 1)."""
    return 1.0 if d <= b else 1.0 / (h * (d - b) + 1.0)


@dataclass(frozen=True)
class Staleness:
    """A staleness function s(d) by name and parameters (plain data, so configs can hold it).

    Args:
        kind: ``constant``, ``polynomial`` ((d + 1)^(-a)) or ``hinge`` (1 if d <= b else
            1 / (h (d - b) + 1)).
        a: polynomial exponent (>= 0; 0 is the constant function).
        b: hinge threshold (>= 0).
        h: hinge slope (> 0).
    """

    kind: str = "polynomial"
    a: float = 0.5
    b: int = 4
    h: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise ConfigError(
                f"staleness kind {self.kind!r} is unknown; use one of {', '.join(STALENESS_KINDS)} "
                f"or a preset ({', '.join(PRESETS)})"
            )
        if not (math.isfinite(self.a) and self.a >= 0):
            raise ConfigError(f"staleness exponent a must be a finite number >= 0, got {self.a}")
        if int(self.b) != self.b or self.b < 0:
            raise ConfigError(f"staleness hinge threshold b must be an integer >= 0, got {self.b}")
        if not (math.isfinite(self.h) and self.h > 0):
            raise ConfigError(f"staleness hinge slope h must be a finite number > 0, got {self.h}")

    @classmethod
    def preset(cls, name: str) -> "Staleness":
        """A named staleness function: ``constant``, ``polynomial``, ``hinge`` (defaults) or
        ``reference`` (the reference simulation's 1 / (1 + 0.1 d) = hinge with b = 0, h = 0.1)."""
        if name not in PRESETS:
            raise ConfigError(f"staleness preset {name!r} is unknown; use one of {', '.join(PRESETS)}")
        return PRESETS[name]

    def __call__(self, d: int) -> float:
        if d < 0:
            raise ValueError(f"staleness must be >= 0, got {d}")
        if self.kind == "constant":
            return constant(d)
        if self.kind == "polynomial":
            return polynomial(d, self.a)
        return hinge(d, int(self.b), self.h)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Staleness] = {
    "constant": Staleness("constant"),
    "polynomial": Staleness("polynomial", a=0.5),
    "hinge": Staleness("hinge", b=4, h=1.0),
    "reference": Staleness("hinge", b=0, h=0.1),
}


def mixing_weight(mix_rate: float, staleness: Staleness, d: int) -> float:
    """FedAsync's w = mix * s(d), in [0, 1]."""
    if not 0.0 <= mix_rate <= 1.0:
        raise ConfigError(f"FedAsync mix must be in [0, 1], got {mix_rate}")
    return float(mix_rate) * staleness(d)


# -- plain state dicts ------------------------------------------------------------------------------


def fedasync_mix(current: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], w: float) -> StateDict:
    """x <- (1 - w) x + w x_new over floating tensors; the rest keep ``current``'s values."""
    return mix(current, [new], [w], base_weight=1.0 - w)


def fedbuff_apply(
    current: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    server_lr: float = 1.0,
) -> StateDict:
    """x <- x + eta_g / K sum_i weights[i] Delta_i (K = len(deltas), weights[i] = s(d_i))."""
    if not deltas:
        return dict(current)
    k = len(deltas)
    return mix(current, deltas, [server_lr * float(w) / k for w in weights], base_weight=1.0)


# -- LoRA adapters, exact ---------------------------------------------------------------------------


def _other_keys(state: Mapping[str, torch.Tensor], layers: Sequence[LoRALayer]) -> list[str]:
    adapters = {k for layer in layers for k in (layer.a_key, layer.b_key)}
    return [k for k in state if k not in adapters]


def fedasync_lora(
    current: Mapping[str, torch.Tensor],
    new: Mapping[str, torch.Tensor],
    w: float,
    layers: Sequence[LoRALayer],
) -> tuple[StateDict, Factors]:
    """(mixed adapter, residual factors): B+ = (1 - w) B + w B', A+ = (1 - w) A + w A', and per
    layer U = s w (1 - w)(B - B'), V = A - A' so that s B+ A+ + U V = (1 - w) s B A + w s B' A'.

    Other floating keys (a head) are mixed linearly, which is exact. Accumulates in float32 or
    wider; the adapter keeps its dtype, the factors are in the accumulation dtype.
    """
    a_b = [k for layer in layers for k in (layer.b_key, layer.a_key)]
    fast = all(current[k].dtype in (torch.float32, torch.float64) and new[k].dtype == current[k].dtype for k in a_b)
    if not fast:
        out = fedasync_mix(current, new, w)
    else:  # one fused pass over the adapter tensors: x + w (x' - x) = (1 - w) x + w x'
        others = _other_keys(current, layers)
        out = fedasync_mix({k: current[k] for k in others}, {k: new[k] for k in others}, w) if others else {}
        out.update(zip(a_b, torch._foreach_lerp([current[k] for k in a_b], [new[k] for k in a_b], float(w))))
        out = {k: out[k] for k in current}
    bs = [current[layer.b_key] for layer in layers]
    if fast:
        us = torch._foreach_sub(bs, [new[layer.b_key] for layer in layers])
        torch._foreach_mul_(us, [layer.scaling * w * (1.0 - w) for layer in layers])
        vs = torch._foreach_sub([current[layer.a_key] for layer in layers], [new[layer.a_key] for layer in layers])
    else:
        dt = acc_dtype(bs[0])
        us = [(b.to(dt) - new[layer.b_key].to(dt)).mul_(layer.scaling * w * (1.0 - w)) for b, layer in zip(bs, layers)]
        vs = [current[layer.a_key].to(dt) - new[layer.a_key].to(dt) for layer in layers]
    return out, {layer.name: (u, v) for layer, u, v in zip(layers, us, vs)}


def fedbuff_lora(
    current: Mapping[str, torch.Tensor],
    updates: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
    weights: Sequence[float],
    layers: Sequence[LoRALayer],
    server_lr: float = 1.0,
) -> tuple[StateDict, Factors]:
    """(new adapter, residual factors) of one FedBuff step over ``updates`` = [(x_i, x_{tau_i})].

    With c_i = eta_g weights[i] / K: B+ = B + sum c_i (B_i - B_{tau_i}), A+ likewise (other floating
    keys likewise, exact), and per layer the factors of R = s B A + T - s B+ A+ with
    T = sum_i c_i s (B_i A_i - B_{tau_i} A_{tau_i}), so that s B+ A+ + R = s B A + T exactly:

        U = [s B, c_1 s B_1, -c_1 s B_{tau_1}, ..., -s B+],  V = [A; A_1; A_{tau_1}; ...; A+]

    (rank <= (2K + 2) r before compression).
    """
    k = len(updates)
    c = [server_lr * float(w) / k for w in weights]
    out: StateDict = dict(current)
    for key, t in current.items():
        if not is_mixable(t) or not updates:
            continue
        acc = t.to(acc_dtype(t))
        for (x, base), ci in zip(updates, c):
            if ci != 0.0:
                acc = acc + (x[key].to(acc.dtype) - base[key].to(acc.dtype)) * ci
        out[key] = acc.to(t.dtype)
    factors: Factors = {}
    for layer in layers:
        s = layer.scaling
        dt = acc_dtype(current[layer.b_key])
        us = [current[layer.b_key].to(dt) * s]
        vs = [current[layer.a_key].to(dt)]
        for (x, base), ci in zip(updates, c):
            us += [x[layer.b_key].to(dt) * (ci * s), base[layer.b_key].to(dt) * (-ci * s)]
            vs += [x[layer.a_key].to(dt), base[layer.a_key].to(dt)]
        us.append(out[layer.b_key].to(dt) * (-s))
        vs.append(out[layer.a_key].to(dt))
        factors[layer.name] = (torch.cat(us, dim=1), torch.cat(vs, dim=0))
    return out, factors


# -- low-rank factors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compression:
    """What :func:`compress_factors` did: Frobenius energies sum sigma_j^2 before and dropped."""

    rank_before: int
    rank_after: int
    energy: float | None
    """None within budget (not computed)."""
    dropped: float


def compress_factors(
    u: torch.Tensor, v: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, Compression]:
    """The best rank-``rank`` factors of U V (d_out x k times k x d_in) by truncated SVD.

    Within budget (k <= rank) the factors are returned unchanged and nothing is dropped. Otherwise
    U = Q_u R_u and V^T = Q_v R_v (reduced QR), the small core R_u R_v^T = P S Q^T is decomposed, and
    U' = Q_u P_b S_b, V' = (Q_v Q_b)^T keep the ``rank`` largest singular values: U V is never formed,
    and Q_u, Q_v are applied as Householder products to the kept columns only (never formed either).
    Energy = ||U V||_F^2 = sum sigma_j^2; dropped = sum over the discarded sigma_j^2.
    """
    k = int(u.shape[1])
    if k <= rank:
        return u, v, Compression(k, k, None, 0.0)
    u2, v2, energy, dropped = compress_batched(u.unsqueeze(0), v.unsqueeze(0), rank)
    return u2[0], v2[0], Compression(k, int(u2.shape[-1]), float(energy[0]), float(dropped[0]))


def compress_batched(
    u: torch.Tensor, v: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`compress_factors` over a batch of equally shaped layers: U (L x d_out x k) and
    V (L x k x d_in) to rank min(rank, k, d_out, d_in); returns (U', V', energy, dropped), the last
    two per layer (float64)."""
    dt = acc_dtype(u)
    batch, d_out, k = u.shape
    d_in = v.shape[-1]
    # Householder QR without forming Q (geqrf): Q is applied to the few kept columns only (ormqr)
    hu, tu = torch.geqrf(u.to(dt))
    hv, tv = torch.geqrf(v.to(dt).mT.contiguous())
    mu, mv = min(d_out, k), min(d_in, k)
    p, sig, qt = torch.linalg.svd(hu[..., :mu, :].triu() @ hv[..., :mv, :].triu().mT)
    keep = min(rank, int(sig.shape[-1]))
    left = torch.zeros(batch, d_out, keep, dtype=dt)
    left[..., :mu, :] = p[..., :keep] * sig[..., None, :keep]
    right = torch.zeros(batch, d_in, keep, dtype=dt)
    right[..., :mv, :] = qt[..., :keep, :].mT
    u2 = torch.ormqr(hu, tu, left)
    v2 = torch.ormqr(hv, tv, right).mT.contiguous()
    sq = sig.double() ** 2
    return u2, v2, sq.sum(-1), sq[..., keep:].sum(-1)


def factors_dense(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U V as a dense d_out x d_in matrix (for tests and evaluation only)."""
    return u @ v
