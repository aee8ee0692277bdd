"""Fed-MoE's matrices on tiny hand-computed tensors: P, R, W_r and W_c."""

from __future__ import annotations

import math

import pytest
import torch

from fedmoe.algorithms.fedmoe import FedMoE, confidences, relevance, routing_weights, sync_weights


def softmax_list(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


# -- P: confidences -------------------------------------------------------------------------------


def test_confidences_probability_mode_is_softmax_at_the_target():
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [1.0, 2.0, 3.0]])
    targets = torch.tensor([2, 0, 1])
    p = confidences(logits, targets, "probability")
    expected = [1 / 3, 2 / 4, math.exp(2) / (math.exp(1) + math.exp(2) + math.exp(3))]
    torch.testing.assert_close(p, torch.tensor(expected))
    assert p.shape == (3,)


def test_confidences_logit_mode_is_the_raw_logit_at_the_target():
    logits = torch.tensor([[0.5, -1.0, 3.0], [7.0, 0.0, -2.0]])
    targets = torch.tensor([1, 2])
    torch.testing.assert_close(confidences(logits, targets, "logit"), torch.tensor([-1.0, -2.0]))


def test_confidences_of_half_precision_logits_are_float32():
    logits = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    p = confidences(logits, torch.tensor([1]))
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor([math.exp(2) / (math.exp(1) + math.exp(2))]))


# -- R: relevance ---------------------------------------------------------------------------------

# n = 3 probe samples, K = 2 experts, m = 2 clients
Q = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])  # n x K
P = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.4]])  # m x n


def test_relevance_sum_is_q_transpose_p_transpose():
    r = relevance(Q, P, "sum")
    assert r.shape == (2, 2)  # K x m
    hand = [
        [0.9 * 0.6 + 0.2 * 0.3 + 0.5 * 0.1, 0.9 * 0.2 + 0.2 * 0.7 + 0.5 * 0.4],
        [0.1 * 0.6 + 0.8 * 0.3 + 0.5 * 0.1, 0.1 * 0.2 + 0.8 * 0.7 + 0.5 * 0.4],
    ]
    torch.testing.assert_close(r, torch.tensor(hand))


def test_relevance_mean_divides_row_e_by_the_gate_mass_of_expert_e():
    r_sum = relevance(Q, P, "sum")
    r_mean = relevance(Q, P, "mean")
    mass = [0.9 + 0.2 + 0.5, 0.1 + 0.8 + 0.5]
    torch.testing.assert_close(r_mean, r_sum / torch.tensor(mass).unsqueeze(1))
    torch.testing.assert_close(r_mean[0, 0], torch.tensor((0.54 + 0.06 + 0.05) / 1.6))


def test_relevance_is_k_by_m_for_non_square_inputs():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(7, 3), 1)  # n=7, K=3
    p = torch.rand(5, 7)  # m=5
    r = relevance(q, p, "mean")
    assert r.shape == (3, 5)
    torch.testing.assert_close(r, (q.t() @ p.t()) / q.sum(0).unsqueeze(1))


def test_relevance_rejects_unknown_normalisation():
    with pytest.raises(ValueError):
        relevance(Q, P, "max")


# -- W_r: routing weights -------------------------------------------------------------------------


def test_routing_weights_are_a_row_softmax():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]])
    w = routing_weights(r)
    torch.testing.assert_close(w[0], torch.tensor(softmax_list([1.0, 2.0, 3.0])))
    torch.testing.assert_close(w[1], torch.tensor([0.25, 0.25, 0.5]))
    torch.testing.assert_close(w.sum(1), torch.ones(2))


def test_routing_weights_temperature_divides_before_the_softmax():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(routing_weights(r, 2.0)[0], torch.tensor(softmax_list([0.5, 1.0, 1.5])))
    # a high temperature flattens, a low one sharpens
    assert routing_weights(r, 100.0).max() < 0.34
    assert routing_weights(r, 0.01).max() > 0.999


def test_sum_normalisation_with_hundreds_of_probe_samples_is_nearly_one_hot_but_mean_is_not():
    torch.manual_seed(0)
    n, k, m = 300, 3, 5
    q = torch.softmax(torch.randn(n, k), dim=1)
    # clients differ a little in how confident they are on the probe set (0.40, 0.45, ..., 0.60)
    base = 0.40 + 0.05 * torch.arange(m).float()
    p = (base.unsqueeze(1) + 0.2 * (torch.rand(m, n) - 0.5)).clamp(0, 1)
    w_sum = routing_weights(relevance(q, p, "sum"))
    w_mean = routing_weights(relevance(q, p, "mean"))
    assert w_sum.shape == w_mean.shape == (k, m)
    # sum: every expert takes essentially one client (the most confident)
    assert torch.all(w_sum.max(1).values > 0.99)
    assert torch.all(w_sum.argmax(1) == m - 1)
    # mean: close to uniform over the m clients
    assert torch.all(w_mean.max(1).values < 0.25)
    assert torch.all(w_mean.min(1).values > 0.15)


# -- W_c: Stage C sync weights --------------------------------------------------------------------


S = torch.tensor([[0.2, 1.0, -0.5], [0.4, 0.0, 2.0]])  # K = 2, m = 3


def test_sync_weights_paper_mode_is_column_softmax_of_main_row_and_alpha_s():
    alpha = 0.3
    w = sync_weights(S, alpha, has_main=True, mode="paper")
    assert w.shape == (3, 3)  # (K + 1) x m
    torch.testing.assert_close(w.sum(0), torch.ones(3))
    for i in range(3):
        column = softmax_list([1 - alpha, alpha * float(S[0, i]), alpha * float(S[1, i])])
        torch.testing.assert_close(w[:, i], torch.tensor(column))
    # column 0 by hand: exp(0.7), exp(0.06), exp(0.12)
    z = math.exp(0.7) + math.exp(0.06) + math.exp(0.12)
    torch.testing.assert_close(w[0, 0], torch.tensor(math.exp(0.7) / z))


def test_sync_weights_shape_is_k_plus_1_by_m_for_non_square_s():
    torch.manual_seed(0)
    s = torch.randn(4, 6)
    w = sync_weights(s, 0.5, has_main=True)
    assert w.shape == (5, 6)
    torch.testing.assert_close(w.sum(0), torch.ones(6))


def test_sync_weights_code_mode_takes_a_softmax_over_experts_first():
    alpha = 0.9
    w = sync_weights(S, alpha, has_main=True, mode="code")
    assert w.shape == (3, 3)
    for i in range(3):
        s_soft = softmax_list([float(S[0, i]), float(S[1, i])])
        column = softmax_list([1 - alpha, alpha * s_soft[0], alpha * s_soft[1]])
        torch.testing.assert_close(w[:, i], torch.tensor(column))


def test_sync_weights_code_mode_is_nearly_uniform_where_paper_mode_is_not():
    s = torch.tensor([[30.0, 0.0], [0.0, 30.0]])
    paper = sync_weights(s, 0.5, has_main=True, mode="paper")
    code = sync_weights(s, 0.5, has_main=True, mode="code")
    assert paper.max() > 0.99
    # softmax(S) is in [0, 1], so alpha * softmax(S) differs from 1 - alpha by at most 0.5
    assert code.max() < 0.4 and code.min() > 0.2


def test_sync_weights_without_a_main_expert_are_a_column_softmax_over_the_k_experts():
    w = sync_weights(S, 0.3, has_main=False, mode="paper")
    assert w.shape == (2, 3)  # K x m: no main row
    torch.testing.assert_close(w, torch.softmax(S, dim=0))
    torch.testing.assert_close(w.sum(0), torch.ones(3))
    torch.testing.assert_close(w[:, 0], torch.tensor(softmax_list([0.2, 0.4])))


def test_sync_weights_rejects_unknown_mode():
    with pytest.raises(ValueError):
        sync_weights(S, 0.5, has_main=True, mode="other")


def test_fedmoe_rejects_bad_options():
    with pytest.raises(ValueError):
        FedMoE(num_routed=0)
    with pytest.raises(ValueError):
        FedMoE(lam=1.5)
    with pytest.raises(ValueError):
        FedMoE(relevance_temperature=0.0)


def test_fedmoe_rejects_bad_schedule_options():
    with pytest.raises(ValueError, match="server_lr_period"):
        FedMoE(server_lr_period=0)
    with pytest.raises(ValueError, match="server_lr_schedule"):
        FedMoE(server_lr_schedule="linear")
    with pytest.raises(ValueError, match="server_lr_gamma"):
        FedMoE(server_lr_gamma=0.0)
    with pytest.raises(ValueError, match="main_update"):
        FedMoE(main_update="median")


def test_server_learning_rate_factors_by_hand():
    cosine = FedMoE(server_lr_schedule="cosine", server_lr_period=4)
    assert [cosine.lr_factor(i) for i in range(5)] == pytest.approx(
        [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]
    )
    step = FedMoE(server_lr_schedule="step", server_lr_period=2, server_lr_gamma=0.5)
    assert [step.lr_factor(i) for i in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert FedMoE().lr_factor(7) == 1.0


# -- the forward's gates, load and Q (the released code's variants) -------------------------------

D_IN, K_E, C_OUT = 4, 3, 3


def linear_gate_moe(top_k: int, gate_value: str, bn: bool = False):
    """A MoE whose gate logits are x[:, :3] (identity gate), experts tiny MLPs (with BatchNorm1d)."""
    from torch import nn

    from fedmoe.models.moe import ServerMoE

    torch.manual_seed(0)

    def expert():
        if bn:
            return nn.Sequential(nn.Linear(D_IN, 5), nn.BatchNorm1d(5), nn.Linear(5, C_OUT))
        return nn.Linear(D_IN, C_OUT)

    gate = nn.Linear(D_IN, K_E)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(K_E, D_IN))
        gate.bias.zero_()
    return ServerMoE([expert() for _ in range(K_E)], [expert()], gate, None, top_k=top_k, gate_value=gate_value,
                     noisy=False)


def test_code_gates_are_a_softmax_over_the_top_k_probabilities():
    moe = linear_gate_moe(top_k=2, gate_value="code").eval()
    x = torch.tensor([[2.0, 1.0, -1.0, 0.0]])
    p = softmax_list([2.0, 1.0, -1.0])
    code = softmax_list([p[0], p[1]])  # the code: softmax over the top-2 probabilities
    torch.testing.assert_close(moe(x).gates, torch.tensor([[code[0], code[1], 0.0]]))
    renormalised = linear_gate_moe(top_k=2, gate_value="renormalised").eval()
    mass = p[0] + p[1]
    torch.testing.assert_close(renormalised(x).gates, torch.tensor([[p[0] / mass, p[1] / mass, 0.0]]))
    for gate_value in ("code", "renormalised"):  # k = 1: exactly 1
        assert torch.equal(linear_gate_moe(1, gate_value).eval()(x).gates, torch.tensor([[1.0, 0.0, 0.0]]))


def test_code_load_takes_thresholds_from_probabilities():
    from fedmoe.models.moe import MoEOutput, load_code, load_smooth

    clean = torch.tensor([[1.0, 0.0, -1.0]])
    noisy = torch.tensor([[1.2, 0.1, -0.5]])
    std = torch.ones(1, 3)
    probs = torch.softmax(noisy, 1)
    gates = torch.tensor([[1.0, 0.0, 0.0]])
    out = MoEOutput(torch.zeros(1, 2), gates, probs, clean, noisy, std, torch.tensor([[0]]))
    p = softmax_list([1.2, 0.1, -0.5])

    def phi(z: float) -> float:
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    # threshold if in: the 2nd largest probability; if out: the largest; compared with logits
    assert 1.2 > p[1] and not 0.1 > p[1] and not -0.5 > p[1]
    expected = [phi(1.0 - p[1]), phi(0.0 - p[0]), phi(-1.0 - p[0])]
    torch.testing.assert_close(load_code(out), torch.tensor(expected))
    assert not torch.allclose(load_code(out), load_smooth(out))


class ProbeContext:
    """Just what :meth:`FedMoE.gate_relevance` asks of a context: a probe set and ``predict``."""

    def __init__(self, x: torch.Tensor) -> None:
        self.probe = x

    @torch.no_grad()
    def predict(self, module, dataset):
        module.eval()
        return module(dataset), torch.zeros(len(dataset), dtype=torch.long)


@pytest.mark.parametrize("top_k", [1, 2])
def test_gates_relevance_is_the_forwards_gate_values(top_k):
    moe = linear_gate_moe(top_k=top_k, gate_value="code")
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(3))
    q = FedMoE(num_routed=K_E, top_k=top_k, relevance_gate="gates", gate_value="code").gate_relevance(moe, ProbeContext(x))
    with torch.no_grad():
        torch.testing.assert_close(q, moe.eval()(x).gates)
    if top_k == 1:  # the code's Q: one-hot top-1, as relevance_gate onehot
        onehot = FedMoE(num_routed=K_E, relevance_gate="onehot").gate_relevance(moe, ProbeContext(x))
        assert torch.equal(q, onehot)


def test_one_sample_group_runs_batchnorm_in_eval_mode():
    moe = linear_gate_moe(top_k=1, gate_value="code", bn=True).train()
    x = torch.tensor([[3.0, 0, 0, 1], [2.0, 0, 0, 2], [1.0, 0, 0, 3], [4.0, 0, 0, 4], [0, 5.0, 0, 5]])
    lonely = moe.experts[1]
    stats = lonely[1].running_mean.clone()
    busy_stats = moe.experts[0][1].running_mean.clone()
    out = moe(x)  # expert 1 gets sample 4 alone: BatchNorm1d in train mode would raise
    assert out.topk.squeeze(1).tolist() == [0, 0, 0, 0, 1]
    assert torch.equal(lonely[1].running_mean, stats)  # running statistics used, not updated
    assert not torch.equal(moe.experts[0][1].running_mean, busy_stats)  # groups of 2+ use batch statistics
    assert lonely.training and lonely[1].training  # the mode is restored
    with torch.no_grad():
        lonely.eval()
        expected_routed = lonely(x[4:])
        lonely.train()
        main = moe.mains[0](x)[4:]
    alpha = float(moe.alpha.detach())
    torch.testing.assert_close(out.logits[4:], alpha * expected_routed + (1 - alpha) * main)


def test_paper_stage_c_with_sum_relevance_starves_the_main_row():
    g = torch.Generator().manual_seed(0)
    n, m = 200, 5
    q = torch.nn.functional.one_hot(torch.randint(0, K_E, (n,), generator=g), K_E).float()
    p = 0.3 + 0.6 * torch.rand(m, n, generator=g)
    paper = sync_weights(relevance(q, p, "sum"), 0.5, has_main=True, mode="paper")
    assert paper[0].max() < 1e-3  # clients never receive E_0
    code = sync_weights(relevance(q, p, "sum"), 0.5, has_main=True, mode="code")
    mean = sync_weights(relevance(q, p, "mean"), 0.5, has_main=True, mode="paper")
    assert code[0].min() > 0.15 and mean[0].min() > 0.15
