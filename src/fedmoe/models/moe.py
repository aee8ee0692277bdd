"""Fed-MoE's server mixture of experts and its training loss, generic over the backbone.

The server model is y = alpha * sum_e g[b,e] E_e(x_b) + (1 - alpha) * E_0(x): K routed experts
E_1..E_K behind a (noisy) top-k gate G, plus the main expert(s) E_0. An expert is any module
mapping x to B x C logits; the gate G and the noise net G_n map x to B x K logits. The loss is
CE + w_aux (cv2(importance) + cv2(load)) + w_ent H_lab + l2 sum(theta^2) (DESIGN section 2).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GateValue = Literal["probability", "renormalised", "code"]
LoadMode = Literal["count", "smooth", "code"]
EntropyMode = Literal["paper", "conditional", "code"]

NOISE_EPSILON = 1e-2
"""Floor added to the noise scale: std = softplus(G_n(x)) + 1e-2 (Shazeer et al., 2017)."""

CV_EPSILON = 1e-10


@dataclass
class MoEOutput:
    """Everything one server-MoE forward produces (B samples, K routed experts, C classes)."""

    logits: Tensor
    """B x C: y = alpha * sum_e g[b,e] E_e(x_b) + (1 - alpha) * mean_main E_0(x)."""
    gates: Tensor
    """B x K: g, the gate values used in the forward (0 for unchosen experts)."""
    probs: Tensor
    """B x K: softmax(h), h possibly noisy."""
    clean_logits: Tensor
    """B x K: G(x)."""
    noisy_logits: Tensor
    """B x K: h after noise (the clean logits when no noise was added)."""
    noise_std: Tensor | None
    """B x K: softplus(G_n(x)) + 1e-2 when noise was added, else None."""
    topk: Tensor
    """B x k: indices of the chosen experts."""


def _batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        return x.shape[0]
    if isinstance(x, Mapping):
        return _batch_size(next(iter(x.values())))
    if isinstance(x, (list, tuple)):
        return _batch_size(x[0])
    raise TypeError(f"cannot find the batch dimension of an input of type {type(x).__name__}")


def _take(x: Any, index: Tensor) -> Any:
    """Samples ``index`` of a batch: a tensor, or a mapping / sequence of batch-first tensors."""
    if isinstance(x, Tensor):
        return x.index_select(0, index)
    if isinstance(x, Mapping):
        return type(x)({key: _take(value, index) for key, value in x.items()})
    if isinstance(x, (list, tuple)):
        return type(x)(_take(value, index) for value in x)
    raise TypeError(f"cannot select samples from an input of type {type(x).__name__}")


def _chosen_mask(topk: Tensor, num_experts: int) -> Tensor:
    mask = torch.zeros(topk.shape[0], num_experts, dtype=torch.bool, device=topk.device)
    return mask.scatter(1, topk, True)


class ServerMoE(nn.Module):
    """Main expert(s) plus K routed experts behind a noisy top-k gate, with sparse dispatch.

    Args:
        experts: the routed experts E_1..E_K.
        mains: the main experts (E_0); empty for ``num_main: 0``, where y = sum_e g E_e(x).
        gate: G, x -> B x K logits.
        noise: G_n, x -> B x K raw noise scales; noise is added only in training mode.
        top_k: k, experts chosen per sample.
        gate_value: ``probability`` keeps softmax(h) at the chosen experts (CE reaches the gate);
            ``renormalised`` divides them by their sum over the top k (a softmax over the top-k
            values of h); ``code`` takes a softmax over the top-k *probabilities*, as the released
            code does (``moe.py``: ``softmax(topk(softmax(h)))``). For k = 1 both give exactly 1.
        alpha_init: initial value of the learnable scalar alpha.
        alpha_clamp: clamp alpha to [0, 1] in the forward.
        noisy: add the gate noise in training mode (when ``noise`` is given).
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        mains: Sequence[nn.Module],
        gate: nn.Module,
        noise: nn.Module | None = None,
        top_k: int = 1,
        gate_value: GateValue = "probability",
        alpha_init: float = 0.5,
        alpha_clamp: bool = False,
        noisy: bool = True,
    ) -> None:
        super().__init__()
        if len(experts) == 0:
            raise ValueError("ServerMoE needs at least one routed expert")
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k must be in [1, {len(experts)}] (the experts), got {top_k}")
        if gate_value not in ("probability", "renormalised", "code"):
            raise ValueError(
                f"gate_value must be 'probability', 'renormalised' or 'code', got {gate_value!r}"
            )
        self.experts = nn.ModuleList(experts)
        self.mains = nn.ModuleList(mains)
        self.gate = gate
        self.noise = noise
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.top_k = top_k
        self.gate_value: GateValue = gate_value
        self.alpha_clamp = alpha_clamp
        self.noisy = noisy

    @property
    def num_experts(self) -> int:
        """K, the number of routed experts."""
        return len(self.experts)

    @property
    def num_main(self) -> int:
        """The number of main experts (0, 1 or more)."""
        return len(self.mains)

    def alpha_value(self) -> Tensor:
        """alpha as used in the forward: clamped to [0, 1] when ``alpha_clamp``."""
        return self.alpha.clamp(0.0, 1.0) if self.alpha_clamp else self.alpha

    def gate_probs(self, x: Any) -> Tensor:
        """softmax(G(x)) without noise (B x K): the relevance Q of Stages B and C."""
        return torch.softmax(self.gate(x), dim=-1)

    def forward(self, x: Any) -> MoEOutput:
        """Route each sample to its top-k experts and mix them with the main expert(s)."""
        if _batch_size(x) == 0:
            raise ValueError("ServerMoE got an empty batch")
        clean = self.gate(x)
        noisy, noise_std = clean, None
        if self.training and self.noisy and self.noise is not None:
            noise_std = F.softplus(self.noise(x)) + NOISE_EPSILON
            noisy = clean + torch.randn_like(clean) * noise_std
        probs = torch.softmax(noisy, dim=-1)
        gates, top_indices = self.route(noisy)
        logits = self._dispatch(x, gates, top_indices)
        if self.num_main:
            alpha = self.alpha_value()
            main = torch.stack([m(x) for m in self.mains]).mean(0)
            logits = alpha * logits + (1 - alpha) * main
        return MoEOutput(logits, gates, probs, clean, noisy, noise_std, top_indices)

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Gate values g (B x K, 0 for unchosen experts) and the top-k indices from gate logits h."""
        probs = torch.softmax(logits, dim=-1)
        top_indices = logits.topk(self.top_k, dim=-1).indices
        chosen = probs.gather(-1, top_indices)
        if self.gate_value == "renormalised":  # = p / sum of the top-k p, with exact zero gradient for k = 1
            chosen = torch.softmax(logits.gather(-1, top_indices), dim=-1)
        elif self.gate_value == "code":
            chosen = torch.softmax(chosen, dim=-1)
        return torch.zeros_like(probs).scatter(-1, top_indices, chosen), top_indices

    def _dispatch(self, x: Any, gates: Tensor, topk: Tensor) -> Tensor:
        """sum_e g[b,e] E_e(x_b), each expert run only on the samples routed to it.

        In training mode an expert that receives a single sample runs it with its BatchNorm layers
        in eval mode (running statistics, left unchanged): batch statistics of one sample are
        undefined (BatchNorm1d raises) or meaningless, and sparse dispatch makes such groups common.
        """
        routed = _chosen_mask(topk, self.num_experts)
        out: Tensor | None = None
        for e, expert in enumerate(self.experts):
            index = routed[:, e].nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            if index.numel() == 1 and self.training:
                with batchnorm_in_eval_mode(expert):
                    y = expert(_take(x, index))
            else:
                y = expert(_take(x, index))
            weighted = y * gates[index, e].unsqueeze(1)
            if out is None:
                out = weighted.new_zeros(gates.shape[0], weighted.shape[1])
            out = out.index_add(0, index, weighted.to(out.dtype))
        assert out is not None
        return out


@contextmanager
def batchnorm_in_eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module``'s BatchNorm layers that are in training mode into eval mode for a block."""
    switched = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in switched:
        m.eval()
    try:
        yield
    finally:
        for m in switched:
            m.train()


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation: unbiased var(v) / (mean(v)^2 + 1e-10); 0 for one value."""
    v = v.float()
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var() / (v.mean() ** 2 + CV_EPSILON)


def importance(gates: Tensor) -> Tensor:
    """Importance of each expert (K): the batch sum of its gate values."""
    return gates.sum(0)


def load_count(gates: Tensor) -> Tensor:
    """Load of each expert (K): the number of samples routed to it (no gradient)."""
    return (gates > 0).sum(0).float()


def load_smooth(out: MoEOutput, k: int | None = None) -> Tensor:
    """Differentiable load (K) of Shazeer et al. (2017): sum_b P(e in top-k | others' noise).

    For sample b and expert e, with the other experts' noisy logits fixed, e stays in the top k
    when its resampled noisy logit exceeds the k-th largest of the others' (the (k+1)-th overall
    when e is chosen, else the k-th): Phi((G(x)_e - threshold) / std_e), all pre-softmax. Falls
    back to :func:`load_count` without noise, or when every expert is always chosen (k = K).
    """
    k = out.topk.shape[1] if k is None else k
    num_experts = out.gates.shape[1]
    if out.noise_std is None or k >= num_experts:
        return load_count(out.gates)
    top = out.noisy_logits.topk(k + 1, dim=1)
    threshold_if_in = top.values[:, k : k + 1]
    threshold_if_out = top.values[:, k - 1 : k]
    is_in = _chosen_mask(top.indices[:, :k], num_experts)
    clean, std = out.clean_logits.float(), out.noise_std.float()
    prob_if_in = torch.special.ndtr((clean - threshold_if_in.float()) / std)
    prob_if_out = torch.special.ndtr((clean - threshold_if_out.float()) / std)
    return torch.where(is_in, prob_if_in, prob_if_out).sum(0)


def load_code(out: MoEOutput) -> Tensor:
    """The released code's load (K) in training with noise (``_prob_in_top_k`` in its ``moe.py``).

    As :func:`load_smooth`, but the thresholds are taken from the top-(k+1) *probabilities*
    softmax(h) and compared with the pre-softmax logits: sample b counts as holding expert e when
    h[b,e] > p_(k+1)[b], and its probability is Phi((G(x)_e - p_(k+1 or k)) / std_e). Falls back to
    :func:`load_count` without noise or when k = K, as the code does.
    """
    k = out.topk.shape[1]
    num_experts = out.gates.shape[1]
    if out.noise_std is None or k >= num_experts:
        return load_count(out.gates)
    top = out.probs.float().topk(k + 1, dim=1).values
    threshold_if_in, threshold_if_out = top[:, k : k + 1], top[:, k - 1 : k]
    is_in = out.noisy_logits.float() > threshold_if_in
    clean, std = out.clean_logits.float(), out.noise_std.float()
    prob_if_in = torch.special.ndtr((clean - threshold_if_in) / std)
    prob_if_out = torch.special.ndtr((clean - threshold_if_out) / std)
    return torch.where(is_in, prob_if_in, prob_if_out).sum(0)


def gating_entropy(
    gates: Tensor, targets: Tensor, num_classes: int, mode: EntropyMode = "paper"
) -> Tensor:
    """Label entropy of the routing H_lab, minimised so each expert concentrates on few labels.

    S[e,y] = sum_b g[b,e] 1[t_b = y] (K x C). ``paper``: mean_e H(S[e,:] / sum_y S[e,y]), with
    0 log 0 = 0 and experts that received nothing contributing 0. ``code``: the released code's
    mean_e H(softmax(S[e,:])), where an empty row is uniform and contributes log C.
    ``conditional``: H(Y | E) = sum_e (S_e / sum S) H(S[e,:] / S_e), each expert weighted by the
    gate mass it received. The unweighted mean rewards routing everything to one expert (its
    value is then H(Y) / K, below that of a balanced but unspecialised routing); H(Y | E) is at its
    maximum H(Y) there and falls only when experts specialise.
    """
    g = gates.to(torch.promote_types(gates.dtype, torch.float32))
    s = g.new_zeros(num_classes, g.shape[1]).index_add(0, targets, g).transpose(0, 1)
    if mode in ("paper", "conditional"):
        total = s.sum(1, keepdim=True)
        p = s / torch.where(total > 0, total, torch.ones_like(total))
        positive = p > 0
        log_p = torch.log(torch.where(positive, p, torch.ones_like(p)))
        h = -torch.where(positive, p * log_p, torch.zeros_like(p)).sum(1)
        if mode == "conditional":
            return (total.squeeze(1) * h).sum() / total.sum().clamp_min(1e-12)
    elif mode == "code":
        log_p = F.log_softmax(s, dim=1)
        h = -(log_p.exp() * log_p).sum(1)
    else:
        raise ValueError(f"entropy mode must be 'paper', 'conditional' or 'code', got {mode!r}")
    return h.mean()


def server_loss(
    out: MoEOutput,
    targets: Tensor,
    model: nn.Module,
    *,
    label_smoothing: float = 0.0,
    w_aux: float = 1.0,
    w_ent: float = 0.1,
    load: LoadMode = "count",
    entropy_mode: EntropyMode = "paper",
    l2: float = 1e-7,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = CE(y, t) + w_aux (cv2(importance) + cv2(load)) + w_ent H_lab + l2 sum(theta^2).

    theta ranges over ``model``'s parameters that require grad. Returns the loss and its
    unweighted parts (detached): ``ce``, ``aux``, ``entropy``, ``l2`` and ``loss``, so that
    loss = ce + w_aux aux + w_ent entropy + l2 * parts["l2"].
    """
    if load == "count":
        expert_load = load_count(out.gates)
    elif load == "smooth":
        expert_load = load_smooth(out)
    elif load == "code":
        expert_load = load_code(out)
    else:
        raise ValueError(f"load must be 'count', 'smooth' or 'code', got {load!r}")
    ce = F.cross_entropy(out.logits.float(), targets, label_smoothing=label_smoothing)
    aux = cv_squared(importance(out.gates)) + cv_squared(expert_load)
    entropy = gating_entropy(out.gates, targets, out.logits.shape[1], entropy_mode)
    squares = [p.float().pow(2).sum() for p in model.parameters() if p.requires_grad]
    weight_norm = torch.stack(squares).sum() if squares else ce.new_zeros(())
    loss = ce + w_aux * aux + w_ent * entropy + l2 * weight_norm
    parts = {"ce": ce, "aux": aux, "entropy": entropy, "l2": weight_norm, "loss": loss}
    return loss, {name: value.detach() for name, value in parts.items()}


def expert_utilisation(gates: Tensor) -> Tensor:
    """Share of samples routed to each expert (K) by the top-k choice; sums to k."""
    if gates.shape[0] == 0:
        return gates.new_zeros(gates.shape[1])
    return (gates > 0).sum(0).float() / gates.shape[0]
