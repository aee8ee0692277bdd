"""Server mixture of experts: forward, sparse dispatch, losses and the gate-training module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.models.moe import (
    MoEOutput,
    ServerMoE,
    cv_squared,
    expert_utilisation,
    gating_entropy,
    importance,
    load_count,
    load_smooth,
    server_loss,
)
from fedmoe.models.moe_module import ServerMoEModule

D, C, K = 4, 3, 3


def make_moe(num_main: int = 1, top_k: int = 1, seed: int = 0, **kwargs) -> ServerMoE:
    torch.manual_seed(seed)
    experts = [nn.Linear(D, C) for _ in range(K)]
    mains = [nn.Linear(D, C) for _ in range(num_main)]
    return ServerMoE(experts, mains, nn.Linear(D, K), nn.Linear(D, K), top_k=top_k, **kwargs)


def dense_reference(moe: ServerMoE, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Every expert on every sample, weighted by the gates: the formula without sparsity."""
    all_experts = torch.stack([expert(x) for expert in moe.experts], dim=1)  # B x K x C
    routed = (gates.unsqueeze(2) * all_experts).sum(1)
    if moe.num_main == 0:
        return routed
    alpha = moe.alpha_value()
    main = torch.stack([m(x) for m in moe.mains]).mean(0)
    return alpha * routed + (1 - alpha) * main


def test_forward_shapes_in_training_mode_include_noise():
    moe = make_moe(top_k=2).train()
    out = moe(torch.randn(5, D))
    assert out.logits.shape == (5, C)
    for tensor in (out.gates, out.probs, out.clean_logits, out.noisy_logits, out.noise_std):
        assert tensor.shape == (5, K)
    assert out.topk.shape == (5, 2)
    assert torch.all(out.noise_std >= 1e-2)
    assert not torch.equal(out.noisy_logits, out.clean_logits)
    torch.testing.assert_close(out.probs, torch.softmax(out.noisy_logits, dim=1))


def test_eval_mode_adds_no_noise():
    moe = make_moe().eval()
    out = moe(torch.randn(5, D))
    assert out.noise_std is None
    assert torch.equal(out.noisy_logits, out.clean_logits)
    expected = torch.softmax(moe.gate.bias, 0)[None]
    torch.testing.assert_close(moe.gate_probs(torch.zeros(1, D)), expected)


def test_probability_gates_are_unrenormalised_softmax_at_chosen_experts():
    moe = make_moe(top_k=2).train()
    out = moe(torch.randn(6, D))
    assert torch.all((out.gates > 0).sum(1) == 2)
    torch.testing.assert_close(out.gates.gather(1, out.topk), out.probs.gather(1, out.topk))
    assert torch.all(out.gates.sum(1) < 1)


def test_renormalised_gates_sum_to_one_over_chosen_experts():
    moe = make_moe(top_k=2, gate_value="renormalised").train()
    out = moe(torch.randn(6, D))
    torch.testing.assert_close(out.gates.sum(1), torch.ones(6))
    top_values = out.noisy_logits.gather(1, out.topk)
    torch.testing.assert_close(out.gates.gather(1, out.topk), torch.softmax(top_values, 1))


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_dispatch_matches_dense_reference_and_runs_experts_on_their_samples_only(top_k):
    moe = make_moe(top_k=top_k).train()
    seen = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    x = torch.randn(8, D)
    torch.manual_seed(1)
    out = moe(x)
    assert sum(seen) == 8 * top_k
    torch.testing.assert_close(out.logits, dense_reference(moe, x, out.gates))


def test_no_main_expert_gives_plain_gated_sum_without_alpha():
    moe = make_moe(num_main=0, top_k=2, alpha_init=0.3).eval()
    x = torch.randn(6, D)
    out = moe(x)
    all_experts = torch.stack([expert(x) for expert in moe.experts], dim=1)
    torch.testing.assert_close(out.logits, (out.gates.unsqueeze(2) * all_experts).sum(1))


def test_several_main_experts_are_averaged_in_the_main_term():
    moe = make_moe(num_main=3, alpha_init=0.8).eval()
    x = torch.randn(6, D)
    out = moe(x)
    routed = dense_reference(make_moe(num_main=0).eval(), x, out.gates)
    main = (moe.mains[0](x) + moe.mains[1](x) + moe.mains[2](x)) / 3
    torch.testing.assert_close(out.logits, 0.8 * routed + 0.2 * main)


def test_alpha_clamp_limits_alpha_to_unit_interval():
    x = torch.randn(4, D)
    clamped = make_moe(alpha_init=1.5, alpha_clamp=True).eval()
    assert clamped.alpha_value().item() == 1.0
    out = clamped(x)
    routed = dense_reference(make_moe(num_main=0).eval(), x, out.gates)
    torch.testing.assert_close(out.logits, routed)
    free = make_moe(alpha_init=1.5).eval()
    assert free.alpha_value().item() == 1.5
    main = free.mains[0](x)
    torch.testing.assert_close(free(x).logits, 1.5 * routed - 0.5 * main)


def test_cross_entropy_reaches_the_gate_with_probability_gates():
    moe = make_moe(top_k=1, gate_value="probability").train()
    x, t = torch.randn(8, D), torch.randint(0, C, (8,))
    F.cross_entropy(moe(x).logits, t).backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    assert moe.noise.weight.grad.abs().sum() > 0


def test_cross_entropy_gives_the_gate_zero_gradient_with_renormalised_top1():
    moe = make_moe(top_k=1, gate_value="renormalised").train()
    x, t = torch.randn(8, D), torch.randint(0, C, (8,))
    out = moe(x)
    assert torch.equal(out.gates.sum(1), torch.ones(8))
    F.cross_entropy(out.logits, t).backward()
    for param in (*moe.gate.parameters(), *moe.noise.parameters()):
        assert param.grad is None or torch.count_nonzero(param.grad) == 0
    assert moe.experts[int(out.topk[0, 0])].weight.grad.abs().sum() > 0


def test_cv_squared_by_hand():
    # [1, 2, 3]: mean 2, unbiased var 1 -> 1 / 4.  [0, 4]: mean 2, var 8 -> 8 / 4.
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(0.25)
    assert cv_squared(torch.tensor([0.0, 4.0])).item() == pytest.approx(2.0)
    assert cv_squared(torch.tensor([2.0, 2.0])).item() == 0.0
    assert cv_squared(torch.tensor([5.0])).item() == 0.0
    assert cv_squared(torch.tensor([0, 0, 3])).item() == pytest.approx(3.0 / 1.0)


def test_importance_and_load_count():
    gates = torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.7, 0.0], [0.2, 0.0, 0.0]])
    torch.testing.assert_close(importance(gates), torch.tensor([0.8, 0.7, 0.0]))
    torch.testing.assert_close(load_count(gates), torch.tensor([2.0, 1.0, 0.0]))


def test_expert_utilisation_is_the_share_of_routed_samples():
    gates = torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.7, 0.0], [0.2, 0.0, 0.0], [0.9, 0.0, 0.0]])
    torch.testing.assert_close(expert_utilisation(gates), torch.tensor([0.75, 0.25, 0.0]))
    assert expert_utilisation(gates).sum().item() == pytest.approx(1.0)


def test_gating_entropy_hand_computed_example_both_modes():
    # 3 samples, 2 experts, 3 classes; targets t = (0, 1, 2).
    # S[e, y] = sum_b g[b, e] 1[t_b = y]:  S = [[0.6, 0, 0.2],   (expert 0: samples 0 and 2)
    #                                           [0, 0.7, 0]]     (expert 1: sample 1)
    # paper: rows / row sums = [0.75, 0, 0.25] and [0, 1, 0];
    #   H0 = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623351, H1 = 0;  H_lab = (H0 + H1) / 2 = 0.2811676.
    # code: rows softmax(S[e]); H(softmax(s)) = ln Z - sum_y s_y e^{s_y} / Z with Z = sum_y e^{s_y}:
    #   Z0 = e^0.6 + 1 + e^0.2, H0 = ln Z0 - (0.6 e^0.6 + 0.2 e^0.2) / Z0 = 1.0663271;
    #   Z1 = 2 + e^0.7,         H1 = ln Z1 - 0.7 e^0.7 / Z1              = 1.0385274;
    #   H_lab = (H0 + H1) / 2 = 1.0524273.
    gates = torch.tensor([[0.6, 0.0], [0.0, 0.7], [0.2, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 2])
    paper = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / 2
    z0, z1 = math.exp(0.6) + 1 + math.exp(0.2), 2 + math.exp(0.7)
    h0 = math.log(z0) - (0.6 * math.exp(0.6) + 0.2 * math.exp(0.2)) / z0
    h1 = math.log(z1) - 0.7 * math.exp(0.7) / z1
    assert paper == pytest.approx(0.2811676, abs=1e-6)
    assert (h0 + h1) / 2 == pytest.approx(1.0524273, abs=1e-6)
    assert gating_entropy(gates, targets, 3, "paper").item() == pytest.approx(paper, abs=1e-6)
    code = (h0 + h1) / 2
    assert gating_entropy(gates, targets, 3, "code").item() == pytest.approx(code, abs=1e-6)


def test_gating_entropy_expert_without_samples_contributes_zero_and_no_nan_gradient():
    gates = torch.tensor([[0.5, 0.0], [0.9, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 0])
    h = gating_entropy(gates, targets, 3, "paper")
    assert h.item() == 0.0
    h.backward()
    assert torch.isfinite(gates.grad).all()
    mixed = torch.tensor([[0.5, 0.0], [0.5, 0.0]], requires_grad=True)
    h = gating_entropy(mixed, torch.tensor([0, 1]), 3, "paper")
    assert h.item() == pytest.approx(math.log(2) / 2)
    h.backward()
    assert torch.isfinite(mixed.grad).all()


def test_gating_entropy_rejects_unknown_mode():
    with pytest.raises(ValueError, match="paper"):
        gating_entropy(torch.ones(2, 2), torch.tensor([0, 1]), 2, "other")


@pytest.mark.parametrize("load", ["count", "smooth"])
@pytest.mark.parametrize("entropy_mode", ["paper", "code"])
def test_server_loss_is_the_weighted_sum_of_its_parts(load, entropy_mode):
    moe = make_moe(top_k=1).train()
    x, t = torch.randn(8, D), torch.randint(0, C, (8,))
    out = moe(x)
    loss, parts = server_loss(
        out, t, moe, label_smoothing=0.1, w_aux=0.5, w_ent=0.2, load=load,
        entropy_mode=entropy_mode, l2=1e-3,
    )
    expected = parts["ce"] + 0.5 * parts["aux"] + 0.2 * parts["entropy"] + 1e-3 * parts["l2"]
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(parts["loss"], loss.detach())
    ce = F.cross_entropy(out.logits, t, label_smoothing=0.1)
    torch.testing.assert_close(parts["ce"], ce.detach())
    expert_load = load_count(out.gates) if load == "count" else load_smooth(out)
    torch.testing.assert_close(
        parts["aux"], (cv_squared(importance(out.gates)) + cv_squared(expert_load)).detach()
    )
    weights = sum(p.pow(2).sum() for p in moe.parameters())
    torch.testing.assert_close(parts["l2"], weights.detach())
    assert all(not value.requires_grad for value in parts.values())
    assert loss.requires_grad


def test_server_loss_l2_covers_only_trainable_parameters():
    moe = make_moe().train()
    moe.experts.requires_grad_(False)
    moe.mains.requires_grad_(False)
    _, parts = server_loss(moe(torch.randn(4, D)), torch.tensor([0, 1, 2, 0]), moe)
    trainable = [*moe.gate.parameters(), *moe.noise.parameters(), moe.alpha]
    torch.testing.assert_close(parts["l2"], sum(p.pow(2).sum() for p in trainable).detach())


def test_load_smooth_has_gradient_wrt_gate_and_noise():
    moe = make_moe(top_k=1).train()
    out = moe(torch.randn(8, D))
    smooth = load_smooth(out)
    assert smooth.shape == (K,)
    assert smooth.sum().item() <= 8 * K
    cv_squared(smooth).backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    assert moe.noise.weight.grad.abs().sum() > 0


def test_load_smooth_falls_back_to_counts_without_noise():
    moe = make_moe(top_k=1).eval()
    out = moe(torch.randn(8, D))
    torch.testing.assert_close(load_smooth(out), load_count(out.gates))


@pytest.mark.parametrize("k", [1, 2])
def test_load_smooth_matches_monte_carlo_frequency_of_being_chosen(k):
    # For each (b, e), keep the other experts' noisy logits and resample e's noise only:
    # load_smooth[e] should be the sum over b of the frequency that e lands in the top k.
    torch.manual_seed(0)
    batch, experts, draws = 4, 4, 20_000
    clean = torch.randn(batch, experts)
    std = 0.2 + torch.rand(batch, experts)
    noisy = clean + torch.randn(batch, experts) * std
    probs = torch.softmax(noisy, 1)
    topk = noisy.topk(k, dim=1).indices
    gates = torch.zeros_like(probs).scatter(1, topk, probs.gather(1, topk))
    out = MoEOutput(clean, gates, probs, clean, noisy, std, topk)
    frequency = torch.zeros(experts)
    for b in range(batch):
        for e in range(experts):
            resampled = clean[b, e] + torch.randn(draws) * std[b, e]
            others = torch.cat([noisy[b, :e], noisy[b, e + 1 :]])
            beaten_by = (others[None, :] > resampled[:, None]).sum(1)
            frequency[e] += (beaten_by < k).float().mean()
    smooth = load_smooth(out, k)
    torch.testing.assert_close(smooth, frequency, atol=0.03, rtol=0)


def bn_expert() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Linear(8, C))


def make_bn_moe() -> ServerMoE:
    torch.manual_seed(0)
    experts = [bn_expert() for _ in range(K)]
    return ServerMoE(experts, [bn_expert()], nn.Linear(D, K), nn.Linear(D, K))


def test_module_optimizer_trains_gate_noise_and_alpha_only_by_default():
    moe = make_bn_moe()
    module = ServerMoEModule(moe, gate_lr=2e-4, alpha_lr=3e-3, weight_decay=1e-4, eps=1e-7)
    optimizer = module.configure_optimizers()
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert set(groups) == {"gate", "alpha"}
    assert groups["gate"]["lr"] == 2e-4 and groups["alpha"]["lr"] == 3e-3
    gate_ids = {id(p) for p in (*moe.gate.parameters(), *moe.noise.parameters())}
    assert {id(p) for p in groups["gate"]["params"]} == gate_ids
    assert groups["alpha"]["params"] == [moe.alpha]
    assert all(g["weight_decay"] == 1e-4 and g["eps"] == 1e-7 for g in optimizer.param_groups)
    assert not any(p.requires_grad for p in (*moe.experts.parameters(), *moe.mains.parameters()))


def test_module_optimizer_with_train_experts_has_per_group_learning_rates():
    moe = make_bn_moe()
    module = ServerMoEModule(
        moe, train_experts=True, expert_lr=1e-3, main_lr=5e-5, experts_alpha_lr=5e-7
    )
    groups = {group["name"]: group for group in module.configure_optimizers().param_groups}
    assert set(groups) == {"gate", "alpha", "experts", "mains"}
    assert groups["gate"]["lr"] == 1e-4
    assert groups["alpha"]["lr"] == 5e-7
    assert groups["experts"]["lr"] == 1e-3 and groups["mains"]["lr"] == 5e-5
    assert len(groups["experts"]["params"]) == len(list(moe.experts.parameters()))
    module.train()
    assert moe.experts.training and moe.mains.training


def test_frozen_experts_keep_batchnorm_statistics_during_gate_training():
    moe = make_bn_moe()
    module = ServerMoEModule(moe)
    module.train()
    assert module.training and moe.gate.training
    assert not any(m.training for m in (*moe.experts.modules(), *moe.mains.modules()))
    before = {k: v.clone() for k, v in moe.state_dict().items() if "running" in k}
    gate_before = moe.gate.weight.detach().clone()
    optimizer = module.configure_optimizers()
    x, t = torch.randn(16, D), torch.randint(0, C, (16,))
    for step in range(2):
        optimizer.zero_grad()
        loss = module.training_step((x, t), step)
        loss.backward()
        optimizer.step()
    after = {k: v for k, v in moe.state_dict().items() if "running" in k}
    assert before.keys() == after.keys() and before
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(gate_before, moe.gate.weight)
    module.eval()
    assert not moe.gate.training
    assert module(x).shape == (16, C)


def test_module_driven_by_fabric_keeps_frozen_experts_in_eval_mode():
    from lightning.fabric import Fabric

    moe = make_bn_moe()
    module = ServerMoEModule(moe)
    fabric = Fabric(accelerator="cpu", devices=1)
    wrapped, optimizer = fabric.setup(module, module.configure_optimizers())
    wrapped.train()
    assert moe.gate.training and not moe.experts.training and not moe.mains.training
    x, t = torch.randn(16, D), torch.randint(0, C, (16,))
    running_mean = moe.experts[0][1].running_mean.clone()
    loss = wrapped.training_step((x, t), 0)
    fabric.backward(loss)
    optimizer.step()
    assert torch.equal(running_mean, moe.experts[0][1].running_mean)
    assert wrapped(x).shape == (16, C)


class FromMapping(nn.Module):
    """A tiny network reading its input from a mapping, as text backbones do."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(D, out_features)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(batch["features"] * batch["mask"])


def test_sparse_dispatch_selects_samples_from_mapping_inputs():
    torch.manual_seed(0)
    experts = [FromMapping(C) for _ in range(K)]
    moe = ServerMoE(experts, [FromMapping(C)], FromMapping(K), FromMapping(K), top_k=2).eval()
    batch = {"features": torch.randn(6, D), "mask": torch.ones(6, 1)}
    out = moe(batch)
    routed = torch.stack([expert(batch) for expert in moe.experts], dim=1)
    expected = 0.5 * (out.gates.unsqueeze(2) * routed).sum(1) + 0.5 * moe.mains[0](batch)
    torch.testing.assert_close(out.logits, expected)
