"""HetLoRA: truncation with zero tails that training cannot revive, zero-padded aggregation weighted
by ||B_k A_k||_F, and rank self-pruning."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedmoe.algorithms.base import ClientResult
from fedmoe.algorithms.fusion import num_bytes
from fedmoe.algorithms.lora import HetLoRA, hetlora_aggregate, prune_decision, tail_norm
from fedmoe.algorithms.lora.hetlora import TailPenalty, pruned_rank, tail_start
from fedmoe.algorithms.lora.layout import LoRALayer


def _tiny_peft(r=4):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    return get_peft_model(net, LoraConfig(r=r, lora_alpha=8, target_modules=["0"], modules_to_save=["2"]))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.05),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_zero_padded_tail_stays_exactly_zero_under_training(kit, make_opt):
    model = _tiny_peft(r=4)
    (layer,) = kit.peft_layers(model)
    state = model.state_dict()
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    ctx = kit.FakeContext([layer], state, trainable)
    algo = HetLoRA(client_ranks=[2], prune=True, prune_gamma=0.5, prune_lambda=0.1)
    server = algo.init_server(state, ctx)
    gen = torch.Generator().manual_seed(1)
    server["global"][layer.b_key] = torch.randn(5, 4, generator=gen)  # a trained global B (B = 0 is trivial)
    plan = algo.configure_client(server, 0, None)
    model.load_state_dict(plan.weights, strict=False)
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    x, y = torch.randn(16, 7, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + plan.regularizer(model)
        loss.backward()
        opt.step()
    a, b = model.get_parameter(layer.a_key), model.get_parameter(layer.b_key)
    assert torch.count_nonzero(a[2:]) == 0 and torch.count_nonzero(b[:, 2:]) == 0
    assert not torch.equal(a[:2], plan.weights[layer.a_key][:2])  # the kept ranks did train


def _square(name="sq", d=2):
    return LoRALayer(name, f"{name}.w", f"{name}.a", f"{name}.b", 1.0)


def test_aggregation_zero_pads_and_weights_by_frobenius_norm_of_b_a():
    layer = _square()
    g = {layer.base_key: torch.zeros(2, 2), layer.a_key: torch.zeros(2, 2), layer.b_key: torch.zeros(2, 2),
         "head": torch.zeros(1)}
    c0 = {layer.a_key: torch.tensor([[1.0, 0.0]]), layer.b_key: torch.tensor([[2.0], [0.0]]), "head": torch.tensor([1.0])}
    c1 = {layer.a_key: torch.tensor([[0.0, 1.0], [1.0, 0.0]]), layer.b_key: torch.eye(2), "head": torch.tensor([4.0])}
    new, info = hetlora_aggregate(g, [c0, c1], [1, 3], [layer])
    w0, w1 = 2 / (2 + math.sqrt(2)), math.sqrt(2) / (2 + math.sqrt(2))  # ||B0 A0|| = 2, ||B1 A1|| = sqrt(2)
    assert info["weights"]["sq"] == pytest.approx([w0, w1])
    torch.testing.assert_close(new[layer.a_key], torch.tensor([[w0, w1], [w1, 0.0]]))
    torch.testing.assert_close(new[layer.b_key], torch.tensor([[2 * w0 + w1, 0.0], [0.0, w1]]))
    torch.testing.assert_close(new["head"], torch.tensor([0.25 * 1 + 0.75 * 4]))  # head: sample-weighted


def test_aggregation_falls_back_to_sample_weights_when_every_update_is_zero():
    layer = _square()
    g = {layer.a_key: torch.zeros(2, 2), layer.b_key: torch.zeros(2, 2)}
    c0 = {layer.a_key: torch.ones(1, 2), layer.b_key: torch.zeros(2, 1)}
    c1 = {layer.a_key: 3 * torch.ones(2, 2), layer.b_key: torch.zeros(2, 2)}
    new, info = hetlora_aggregate(g, [c0, c1], [1, 1], [layer])
    assert info["weights"]["sq"] == [0.5, 0.5]
    torch.testing.assert_close(new[layer.a_key], torch.tensor([[2.0, 2.0], [1.5, 1.5]]))


def test_pruning_rule_prunes_only_when_the_tail_norm_shrank():
    assert tail_start(8, 0.99) == 7 and pruned_rank(8, 0.99) == 7
    assert tail_start(4, 0.5) == 2 and pruned_rank(4, 0.5) == 2 and pruned_rank(1, 0.5) == 1
    assert pruned_rank(3, 0.5, min_rank=2) == 2
    layer = _square("l", 4)
    gen = torch.Generator().manual_seed(0)
    sent = {layer.a_key: torch.randn(4, 6, generator=gen), layer.b_key: torch.randn(5, 4, generator=gen)}
    shrunk = {layer.a_key: sent[layer.a_key].clone(), layer.b_key: sent[layer.b_key].clone()}
    shrunk[layer.b_key][:, 2:] *= 0.5
    grown = {layer.a_key: sent[layer.a_key] * 2, layer.b_key: sent[layer.b_key]}
    want = torch.linalg.vector_norm(sent[layer.b_key][:, 2:]) * torch.linalg.vector_norm(sent[layer.a_key][2:])
    torch.testing.assert_close(tail_norm(sent, [layer], 4, 0.5), want)
    assert prune_decision(sent, shrunk, [layer], 4, 0.5) == 2
    assert prune_decision(sent, grown, [layer], 4, 0.5) == 4
    assert prune_decision(sent, sent, [layer], 4, 0.5) == 4  # unchanged is not shrunk
    assert prune_decision(sent, shrunk, [layer], 4, 0.5, min_rank=3) == 3


def test_tail_penalty_reaches_the_adapters_through_module_net_and_only_the_tail():
    model = _tiny_peft(r=4)
    layers = [LoRALayer("l", "base_model.model.0.base_layer.weight", "base_model.model.0.lora_A.default.weight",
                        "base_model.model.0.lora_B.default.weight", 2.0)]
    with torch.no_grad():
        model.get_parameter(layers[0].b_key).normal_()
    holder = nn.Module()
    holder.net = model  # what the regulariser receives: the LightningModule, network at .net
    TailPenalty(layers, rank=4, gamma=0.5, lam=0.1)(holder).backward()
    grad_a = model.get_parameter(layers[0].a_key).grad
    assert grad_a[:2].abs().max() == 0 and grad_a[2:].abs().max() > 0


def test_hetlora_round_prunes_drops_the_tail_and_counts_the_kept_ranks(kit):
    layers = kit.make_layers(r=4)
    g = kit.make_global(layers, r=4)
    trainable = {k for l in layers for k in (l.a_key, l.b_key)} | set(kit.HEAD)
    ctx = kit.FakeContext(layers, g, trainable)
    algo = HetLoRA(client_ranks=[4, 2], prune=True, prune_gamma=0.5)
    state = algo.init_server(g, ctx)
    results = []
    for cid in (0, 1):
        plan = algo.configure_client(state, cid, None)
        assert plan.regularizer is not None
        w = {k: plan.weights[k].clone() for k in plan.upload_keys}
        if cid == 0:  # client 0's tail (ranks 2..3) shrinks: it prunes to rank 2
            for l in layers:
                w[l.b_key][:, 2:] *= 0.1
        else:  # client 1 (rank 2, tail = rank 1) grows its tail: it keeps rank 2
            for l in layers:
                w[l.b_key][:, 1:2] *= 3
        results.append(ClientResult(client_id=cid, num_samples=1, weights=w))
    sent1 = algo.configure_client(state, 1, None)
    for l in layers:
        assert not sent1.weights[l.a_key][2:].any() and not sent1.weights[l.b_key][:, 2:].any()
    rank2 = sum((kit.DIMS[l.name][0] + kit.DIMS[l.name][1]) * 2 * 8 for l in layers)
    head = num_bytes({k: g[k] for k in kit.HEAD})
    assert sent1.wire_bytes == rank2 + head
    algo.configure_client(state, 0, None)
    assert algo.upload_bytes(results[0]) == rank2 + head  # pruned before upload
    new = algo.aggregate(state, results, ctx)
    assert new["ranks"] == {0: 2, 1: 2}
    for l in layers:
        assert not new["global"][l.a_key][2:].any()  # the pruned tail is not aggregated
    assert algo.configure_client(new, 0, None).wire_bytes == rank2 + head
    assert algo.round_metrics(new) == {"lora/rank_mean": 2.0, "lora/rank_min": 2, "lora/rank_max": 2}


def test_seeded_rank_assignment_is_deterministic_and_in_range(kit):
    a, b = HetLoRA(min_rank=2, max_rank=6, seed=4), HetLoRA(min_rank=2, max_rank=6, seed=4)
    ranks = [a.initial_rank(cid, 8) for cid in range(40)]
    assert ranks == [b.initial_rank(cid, 8) for cid in range(40)]
    assert min(ranks) >= 2 and max(ranks) <= 6 and len(set(ranks)) > 2
    assert HetLoRA(client_ranks=[1, 3]).initial_rank(5, 8) == 3
