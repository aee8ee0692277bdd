"""SORF-VeRA: its structured-orthogonal parametrisation and an exact federated aggregation.

The parametrisation (seed 004's fork, JulianPMenon/fedex-vera, ``sorf_vera.py`` and
``models.py: _sorf_vera_forward``) is

    delta W = S Gamma(b) B_s Lambda_d A_s                     (``nn.Linear`` layout, d_out x d_in)

- ``A_s`` (r x d_in), ``B_s`` (d_out x r): VeRA's frozen shared projections (``projection_prng_key``).
- ``S`` (d_out x d_out): a frozen orthonormal mixer built from ``sorf_seed``
  (``build_sorf_matrix``): for each of 3 stages, a block-diagonal of SORF blocks
  D1 H D2 H D3 (H the normalised Sylvester-Hadamard matrix, D random signs; block sizes the
  binary partition of d_out, block seed ``seed + 1000 stage + block``), conjugated by a random
  permutation (seed ``seed + 100000 + stage``); S is the product of the stages, last on the left.
- ``Gamma(b)`` (``build_gamma``): block-diagonal with 2x2 blocks [[a_j, -c_j], [c_j, a_j]],
  a = ``b_real``, c = ``b_imag`` (d_out / 2 each): a complex scaling of each output pair.
- ``Lambda_d = scale * G(angles)`` (``build_lambda_d_rot``): G = R_0 R_1 ... R_{K-1}, one Givens
  rotation [[cos t, -sin t], [sin t, cos t]] per plane (p, q), p < q, in the order (0,1), (0,2), ...,
  (r-2, r-1); K = r (r - 1) / 2 angles and one scalar scale.

The reference trains only ``scale`` and ``angles`` (b is frozen on the clients) and, after averaging
the clients' Lambda_d matrices, refits the averaged delta W back into (b, scale, angles)
(``fed_agg.py: aggregate_models_sorf_vera``): a rank-r SVD U Sigma V^T of delta W, then
``fit_b`` (least squares of Gamma(b) B_s on S^{-1} U Sigma, per 2x2 block) and ``fit_d`` (the
nearest scaled rotation to V^T pinv(A_s)). That assumes S Gamma B ~ U Sigma and Lambda A ~ V^T,
which ignores the r x r ambiguity of any factorisation (and a mean of scaled rotations is not a
scaled rotation): the refit is lossy even for one client (relative error of delta W about 1).

Ours (``refit="fold"``, the default) keeps what the parametrisation represents exactly and folds the
rest into the frozen base, as FedEx-LoRA does:
    b <- sum p_i b_i  (Gamma is linear in b),   (scale, angles) <- nearest scaled rotation of
    sum p_i Lambda_i,   W <- W + S (sum p_i Gamma(b_i) B_s Lambda_i - Gamma(b_bar) B_s Lambda_new) A_s,
so the aggregated effective weight equals sum_i p_i (W + delta W_i) exactly. The residual is
S M A_s with M d_out x r; when b is not trained (the reference setting) M = Gamma(b) B_s dLambda and a
client that holds S, b, B_s and A_s rebuilds it from the r x r matrix dLambda.
``refit="reference"`` reproduces the reference's lossy refit for comparison.

Measured (float64; d_out = d_in in {64, 768}, r in {4, 8, 16}, clients' scale 0.1 +- 0.05 and angles
N(0, 0.01..0.3), b frozen or trained): the reference refit leaves a relative error of 0.83-0.98 of
the averaged delta W, for one client as for three; ours leaves 0 (1e-15) after folding, and the part
it folds (the mean Lambda's distance to a scaled rotation) is 0 for one client and 1e-4-0.27 of the
update for three, growing with the spread of the clients' angles and with r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fedmoe.algorithms.base import ClientResult, ServerContext, ServerState, StateDict
from fedmoe.algorithms.lora.layout import SORFVeRALayer, to_base_layout
from fedmoe.algorithms.lora.vera import (
    VeRAFamily,
    add_to_base,
    check_weighting,
    init_corrections,
    other_trainable_keys,
    record_corrections,
)
from fedmoe.algorithms.lora.rules import register_rule
from fedmoe.errors import FedMoEError

REFITS = ("fold", "reference")


# -- the parametrisation ----------------------------------------------------------------------------


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised Sylvester-Hadamard matrix of size n (a power of 2), as ``scipy.linalg.hadamard(n) / sqrt(n)``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of 2, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return 2.0 * torch.randint(0, 2, (n,), generator=generator).to(torch.float64) - 1.0


def sorf_block(n: int, seed: int) -> torch.Tensor:
    """D1 H D2 H D3 (float64), signs drawn in that order from a CPU generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d1, d2, d3 = (_random_signs(n, gen) for _ in range(3))
    h = hadamard(n)
    return (d1.unsqueeze(1) * h * d2) @ (h * d3)


def power2_partition(n: int) -> list[int]:
    """n as a sum of descending powers of two (its binary digits)."""
    return [1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1]


def sorf_matrix(d_out: int, seed: int, num_stages: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal mixer S (d_out x d_out) of the reference's ``build_sorf_matrix``."""
    if d_out < 1 or num_stages < 1:
        raise ValueError(f"need d_out >= 1 and num_stages >= 1, got {d_out}, {num_stages}")
    parts = power2_partition(d_out)
    s = torch.eye(d_out, dtype=torch.float64)
    for stage in range(num_stages):
        blocks = torch.block_diag(*(sorf_block(n, seed + 1000 * stage + i) for i, n in enumerate(parts)))
        perm = torch.randperm(d_out, generator=torch.Generator(device="cpu").manual_seed(seed + 100_000 + stage))
        s = blocks[perm][:, perm] @ s
    return s.to(dtype).contiguous()


def gamma(b_real: torch.Tensor, b_imag: torch.Tensor) -> torch.Tensor:
    """Gamma(b): block-diagonal, blocks [[a_j, -c_j], [c_j, a_j]] (d_out x d_out)."""
    k = b_real.shape[0]
    g = torch.zeros(2 * k, 2 * k, dtype=b_real.dtype, device=b_real.device)
    i = torch.arange(k, device=b_real.device) * 2
    g[i, i] = b_real
    g[i, i + 1] = -b_imag
    g[i + 1, i] = b_imag
    g[i + 1, i + 1] = b_real
    return g


def apply_gamma(h: torch.Tensor, b_real: torch.Tensor, b_imag: torch.Tensor) -> torch.Tensor:
    """h @ Gamma(b)^T over the last dimension (d_out), without building Gamma."""
    even, odd = h[..., 0::2], h[..., 1::2]
    return torch.stack([b_real * even - b_imag * odd, b_imag * even + b_real * odd], dim=-1).flatten(-2)


def givens_pairs(r: int) -> list[tuple[int, int]]:
    """The planes (p, q), p < q, in the reference's order (``givens_pair_indices``)."""
    return [(p, q) for p in range(r - 1) for q in range(p + 1, r)]


def num_angles(r: int) -> int:
    return r * (r - 1) // 2


_TREE_MAX_RANK = 16  # up to it a balanced tree of all K Givens matrices is fastest; above, the fans


def rotation(angles: torch.Tensor, r: int) -> torch.Tensor:
    """G(angles) = R_0 R_1 ... R_{K-1} (r x r), differentiable in the angles.

    Equal to the reference's chain of K = r (r - 1) / 2 single rotations, built faster: for r <= 16
    all Givens matrices at once, multiplied pairwise as a balanced tree (order kept); above, as
    r - 1 "fans" (see :func:`_fan`). Forward plus backward on one CPU thread: 0.01 s at r = 16,
    0.06 s at r = 32, 0.4 s at r = 128, 2 s at r = 256 (the sequential chain: 0.05, 0.3, 4, 21 s)."""
    eye = torch.eye(r, dtype=angles.dtype, device=angles.device)
    pairs = givens_pairs(r)
    if not pairs:
        return eye
    cos, sin = torch.cos(angles), torch.sin(angles)
    if r <= _TREE_MAX_RANK:
        return _tree_product(cos, sin, pairs, eye)
    # G = F_0 F_1 ... F_{r-2}; F_p acts on indices p..r-1 and G's lower-right block grows from F_{r-2}.
    y = eye[:1, :1]
    end = len(pairs)
    for p in range(r - 2, -1, -1):
        n = r - 1 - p
        f = _fan(cos[end - n : end], sin[end - n : end])
        end -= n
        y = torch.cat([f[:, :1], f[:, 1:] @ y], dim=1)
    return y


def _tree_product(
    cos: torch.Tensor, sin: torch.Tensor, pairs: list[tuple[int, int]], eye: torch.Tensor
) -> torch.Tensor:
    """R_0 R_1 ... R_{k-1} for the given planes, by pairwise batched products (order kept)."""
    k = len(pairs)
    dev = eye.device
    p = torch.tensor([a for a, _ in pairs], device=dev)
    q = torch.tensor([b for _, b in pairs], device=dev)
    i = torch.arange(k, device=dev)
    mats = eye.expand(k, *eye.shape).clone().index_put(
        (i.repeat(4), torch.cat([p, p, q, q]), torch.cat([p, q, p, q])), torch.cat([cos, -sin, sin, cos])
    )
    while mats.shape[0] > 1:
        if mats.shape[0] % 2:
            mats = torch.cat([mats, eye.unsqueeze(0)])
        mats = mats[0::2] @ mats[1::2]
    return mats[0]


def _fan(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """F = R_(0,1) R_(0,2) ... R_(0,n) ((n+1) x (n+1)), the rotations that share index 0, in closed form.

    With t[j, i] = c_{j+1} ... c_i (1 when i <= j): F[0,0] = t[0,n], F[0,i] = -s_i t[0,i-1],
    F[j,0] = s_j t[j,n], F[j,j] = c_j, F[j,i] = -s_j s_i t[j,i-1] for i > j >= 1, 0 below
    (unrolling the chain's recurrence on row 0); products by cumprod, so cos = 0 is safe."""
    n = c.shape[0]
    j = torch.arange(n + 1, device=c.device).unsqueeze(1)
    k = torch.arange(n, device=c.device).unsqueeze(0)
    one = torch.ones((), dtype=c.dtype, device=c.device)
    t = torch.cat([one.expand(n + 1, 1), torch.cumprod(torch.where(k >= j, c.expand(n + 1, n), one), dim=1)], dim=1)
    top = torch.cat([t[0, n:], -s * t[0, :n]])
    inner = torch.triu(-torch.outer(s, s) * t[1:, :n], 1) + torch.diag(c)
    return torch.cat([top.unsqueeze(0), torch.cat([(s * t[1:, n]).unsqueeze(1), inner], dim=1)], dim=0)


def lambda_d(scale: torch.Tensor, angles: torch.Tensor, r: int) -> torch.Tensor:
    """Lambda_d = scale * G(angles) (r x r)."""
    return scale * rotation(angles, r)


def rotation_angles(o: torch.Tensor) -> torch.Tensor:
    """Givens angles of a proper rotation O, inverse of :func:`rotation` (``decompose_orthogonal_to_givens``)."""
    r = o.shape[0]
    w = o.clone()
    pairs = givens_pairs(r)
    angles = torch.zeros(len(pairs), dtype=o.dtype, device=o.device)
    for idx, (p, q) in enumerate(pairs):
        theta = torch.atan2(w[q, p], w[p, p])
        angles[idx] = theta
        c, s = torch.cos(theta), torch.sin(theta)
        wp, wq = w[p].clone(), w[q].clone()
        w[p] = c * wp + s * wq
        w[q] = -s * wp + c * wq
    return angles


def nearest_scaled_rotation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, angles) minimising ||x - scale G(angles)||_F: the polar factor made proper (flip the
    smallest singular direction when det < 0), scale = mean of the signed singular values (the core
    of the reference's ``fit_d``)."""
    p, sv, qt = torch.linalg.svd(x)
    if torch.det(p @ qt) < 0:
        flip = torch.ones_like(sv)
        flip[-1] = -1
        p = p * flip
        sv = sv * flip
    return sv.mean(), rotation_angles(p @ qt)


def sorf_delta(
    sorf: torch.Tensor,
    b_real: torch.Tensor,
    b_imag: torch.Tensor,
    proj_b: torch.Tensor,
    scale: torch.Tensor,
    angles: torch.Tensor,
    proj_a: torch.Tensor,
) -> torch.Tensor:
    """delta W = S Gamma(b) B_s Lambda_d A_s (d_out x d_in)."""
    r = proj_a.shape[0]
    return sorf @ _middle(b_real, b_imag, proj_b, lambda_d(scale, angles, r)) @ proj_a


def _middle(b_real: torch.Tensor, b_imag: torch.Tensor, proj_b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Gamma(b) B_s Lambda (d_out x r)."""
    return apply_gamma((proj_b @ lam).T, b_real, b_imag).T


# -- the reference's refit --------------------------------------------------------------------------


def fit_b(sorf: torch.Tensor, proj_b: torch.Tensor, left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """b minimising ||Gamma(b) B_s - S^{-1} left||_F, block by block (the reference's ``fit_b`` with
    ``left = U_r diag(Sigma_r)``). Each block is a complex scalar z_j = a_j + i c_j multiplying the
    complex row beta = B[2j] + i B[2j+1], so z_j = <beta, tau> / <beta, beta> in closed form."""
    target = torch.linalg.solve(sorf, left)
    beta = torch.complex(proj_b[0::2], proj_b[1::2])
    tau = torch.complex(target[0::2], target[1::2])
    z = (beta.conj() * tau).sum(-1) / (beta.abs() ** 2).sum(-1)
    return z.real.contiguous(), z.imag.contiguous()


def fit_d(proj_a: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, angles) from the nearest scaled rotation to V_r^T pinv(A_s) (the reference's ``fit_d``)."""
    return nearest_scaled_rotation(right.T @ torch.linalg.pinv(proj_a))


def reference_refit(
    delta: torch.Tensor, sorf: torch.Tensor, proj_b: torch.Tensor, proj_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b_real, b_imag, scale, angles) refit to ``delta`` as ``aggregate_models_sorf_vera`` does."""
    r = proj_a.shape[0]
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    b_real, b_imag = fit_b(sorf, proj_b, u[:, :r] * sv[:r])
    scale, angles = fit_d(proj_a, vh[:r].T)
    return b_real, b_imag, scale, angles


# -- aggregation of one layer -----------------------------------------------------------------------


@dataclass
class SORFParams:
    """One layer's SORF-VeRA vectors."""

    b_real: torch.Tensor
    b_imag: torch.Tensor
    scale: torch.Tensor
    angles: torch.Tensor


@dataclass
class SORFAggregate:
    params: SORFParams
    residual: torch.Tensor | None
    """What is folded into the base (d_out x d_in, ``nn.Linear`` layout); None for ``reference``."""
    refit_error: float
    """||delta W(params) - sum p_i delta W_i||_F / ||sum p_i delta W_i||_F before any folding."""


def aggregate_sorf_vera(
    clients: Sequence[SORFParams],
    weights: torch.Tensor,
    sorf: torch.Tensor,
    proj_b: torch.Tensor,
    proj_a: torch.Tensor,
    refit: str = "fold",
) -> SORFAggregate:
    """Aggregate one layer (float64). ``fold``: exact (mean b, nearest scaled rotation of the mean
    Lambda, residual to the base); ``reference``: the reference's SVD refit, no residual."""
    f64 = torch.float64
    p = weights.to(f64)
    s, b_, a_ = sorf.to(f64), proj_b.to(f64), proj_a.to(f64)
    r = a_.shape[0]
    lams = [lambda_d(c.scale.to(f64), c.angles.to(f64), r) for c in clients]
    target_mid = sum(
        w * _middle(c.b_real.to(f64), c.b_imag.to(f64), b_, lam) for w, c, lam in zip(p, clients, lams)
    )
    target = s @ target_mid @ a_
    if refit == "reference":
        b_real, b_imag, scale, angles = reference_refit(target, s, b_, a_)
    else:
        b_real = sum(w * c.b_real.to(f64) for w, c in zip(p, clients))
        b_imag = sum(w * c.b_imag.to(f64) for w, c in zip(p, clients))
        scale, angles = nearest_scaled_rotation(sum(w * lam for w, lam in zip(p, lams)))
    new = SORFParams(b_real, b_imag, scale, angles)
    gap = s @ (target_mid - _middle(b_real, b_imag, b_, lambda_d(scale, angles, r))) @ a_
    norm = float(target.norm())
    error = float(gap.norm()) / norm if norm > 0 else 0.0
    return SORFAggregate(new, None if refit == "reference" else gap, error)


# -- the algorithm ----------------------------------------------------------------------------------


@register_rule("sorf_vera")
class SORFVeRA(VeRAFamily):
    """SORF-VeRA: exact aggregation with the residual folded into the base (or the reference's refit).

    Args:
        weighting: ``samples`` (p_i = n_i / sum n) or ``uniform`` (the reference's plain mean).
        refit: ``fold`` (exact, default) or ``reference`` (the fork's lossy SVD refit of
            (b, scale, angles); b then changes on the server and travels to the clients).
    """

    rule = "sorf_vera"
    layer_type = SORFVeRALayer
    layer_label = "SORF-VeRA"
    build_hint = "build it with fedmoe.models.sorf_vera.apply_sorf_vera and target_modules that match its layers"

    def __init__(self, weighting: str = "samples", refit: str = "fold") -> None:
        check_weighting(self.rule, weighting)
        if refit not in REFITS:
            raise FedMoEError(
                f"{self.rule}: federation.algorithm.init_args.refit={refit!r} is unknown; "
                f"use one of {', '.join(REFITS)}"
            )
        self.weighting = weighting
        self.refit = refit

    def init_server(self, template: StateDict, ctx: ServerContext) -> ServerState:
        layers = self._layers(ctx)
        trainable = ctx.trainable_keys()
        d_keys = [k for layer in layers for k in (layer.d_scale_key, layer.d_angles_key)]
        b_keys = [k for layer in layers for k in (layer.b_real_key, layer.b_imag_key)]
        bases = [layer.base_key for layer in layers]
        for k in d_keys + b_keys + bases:
            if k not in template:
                raise FedMoEError(f"{self.rule}: adapter key {k!r} is not in the client network's state dict")
        b_trained = [k for k in b_keys if k in trainable]
        head = other_trainable_keys(ctx, set(d_keys) | set(b_keys), set(bases))
        # b reaches the clients when it can change: trained there, or refit by the server.
        b_moves = b_keys if self.refit == "reference" else b_trained
        state: ServerState = {
            "global": {k: template[k].detach().clone() for k in d_keys + b_keys + head + bases},
            "upload_keys": d_keys + b_trained + head,
            "head_keys": head,
            "sent_keys": d_keys + b_moves + head,
            "refit_error": None,
        }
        caps = []
        for layer in layers:
            d_out, r = layer.proj_b.shape
            b_free = layer.b_real_key in trainable
            caps.append(min(d_out * layer.proj_a.shape[1], d_out * r if b_free else r * r))
        init_corrections(state, caps, template[bases[0]].element_size())
        return state

    def aggregate(self, state: ServerState, results: list[ClientResult], ctx: ServerContext) -> ServerState:
        g = state["global"]
        new, p = self._start_round(state, results)
        elements, errors = [], []
        for layer in self._layers(ctx):
            clients = [
                SORFParams(*(r.weights.get(k, g[k]) for k in _param_keys(layer))) for r in results
            ]
            agg = aggregate_sorf_vera(clients, p, layer.sorf, layer.proj_b, layer.proj_a, self.refit)
            q = agg.params
            for k, v in zip(_param_keys(layer), (q.b_real, q.b_imag, q.scale, q.angles)):
                new[k] = v.to(g[k].dtype).reshape(g[k].shape)
            errors.append(agg.refit_error)
            if agg.residual is not None and bool(agg.residual.abs().max() > 0):
                new[layer.base_key] = add_to_base(g[layer.base_key], agg.residual, layer.fan_in_fan_out)
                d_out, r = layer.proj_b.shape
                elements.append(d_out * r if layer.b_real_key in state["upload_keys"] else r * r)
            else:
                elements.append(0)
        out = record_corrections({**state, "global": new}, results, elements)
        out["refit_error"] = sum(errors) / len(errors)
        return out

    def round_metrics(self, state: ServerState) -> dict[str, Any]:
        metrics = super().round_metrics(state)
        if state.get("refit_error") is not None:
            metrics["sorf_vera/refit_error"] = state["refit_error"]
        return metrics


def _param_keys(layer: SORFVeRALayer) -> tuple[str, str, str, str]:
    return layer.b_real_key, layer.b_imag_key, layer.d_scale_key, layer.d_angles_key


def delta_weights(layers: Sequence[SORFVeRALayer], weights: StateDict) -> dict[str, torch.Tensor]:
    """Each layer's delta W (``nn.Linear`` layout, float64) from a state dict's vectors."""
    f64 = torch.float64
    return {
        layer.name: sorf_delta(
            layer.sorf.to(f64),
            *(weights[k].to(f64) for k in (layer.b_real_key, layer.b_imag_key)),
            layer.proj_b.to(f64),
            *(weights[k].to(f64) for k in (layer.d_scale_key, layer.d_angles_key)),
            layer.proj_a.to(f64),
        )
        for layer in layers
    }


def effective_weights(layers: Sequence[SORFVeRALayer], weights: StateDict) -> dict[str, torch.Tensor]:
    """Each layer's merged weight W + delta W in ``nn.Linear`` layout (float64)."""
    deltas = delta_weights(layers, weights)
    return {
        layer.name: to_base_layout(weights[layer.base_key], layer.fan_in_fan_out).to(torch.float64) + deltas[layer.name]
        for layer in layers
    }
