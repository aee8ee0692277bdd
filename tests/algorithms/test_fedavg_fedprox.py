"""FedAvg aggregation and FedProx's proximal term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmoe.algorithms import ClientResult, FedAvg, FedProx
from fedmoe.algorithms.fedprox import ProximalTerm


class Wrapped(nn.Module):
    """A module whose trainable network is ``net`` (as the Classifier LightningModule)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.extra = nn.Linear(2, 2)  # not under net: not part of the proximal term


def seeded_states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    states = []
    for i in range(n):
        bn = nn.BatchNorm1d(3)
        with torch.no_grad():
            bn.weight.normal_()
            bn.running_mean.normal_()
        bn.num_batches_tracked.fill_(10 * (i + 1))
        states.append(bn.state_dict())
    return states


def test_fedavg_init_server_copies_the_template():
    template = nn.Linear(3, 2).state_dict()
    state = FedAvg().init_server(template, ctx=None)
    for k in template:
        assert torch.equal(state["global"][k], template[k])
        assert state["global"][k].data_ptr() != template[k].data_ptr()


def test_fedavg_aggregate_is_the_sample_weighted_mean():
    glob, a, b, c = seeded_states(4)
    algo = FedAvg()
    results = [ClientResult(7, 10, a), ClientResult(2, 30, b), ClientResult(4, 60, c)]
    new = algo.aggregate({"global": glob, "round": 3}, results, ctx=None)
    assert new["round"] == 3  # other server state is kept
    for key in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(new["global"][key], 0.1 * a[key] + 0.3 * b[key] + 0.6 * c[key])
    # the counter is the global model's, not an average of the clients'
    assert new["global"]["num_batches_tracked"].item() == 10
    assert new["global"]["num_batches_tracked"].dtype == torch.int64


def test_fedavg_configure_client_sends_the_global_model():
    glob = seeded_states(1)[0]
    plan = FedAvg().configure_client({"global": glob}, 3, None)
    assert plan.weights is glob and plan.regularizer is None and plan.transmit


def test_proximal_term_equals_half_mu_times_squared_distance():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    anchor = {k: v + torch.randn_like(v) for k, v in net.state_dict().items()}
    mu = 0.3
    value = ProximalTerm(anchor, mu)(net)
    hand = 0.0
    for name in ("weight", "bias"):
        diff = net.state_dict()[name] - anchor[name]
        hand += float((diff**2).sum())
    torch.testing.assert_close(value, torch.tensor(mu / 2 * hand))


def test_proximal_term_gradient_is_mu_times_difference():
    torch.manual_seed(1)
    net = nn.Linear(3, 2)
    anchor = {k: v + torch.randn_like(v) for k, v in net.state_dict().items()}
    mu = 0.5
    ProximalTerm(anchor, mu)(net).backward()
    torch.testing.assert_close(net.weight.grad, mu * (net.weight.detach() - anchor["weight"]))
    torch.testing.assert_close(net.bias.grad, mu * (net.bias.detach() - anchor["bias"]))
    # the anchor is a constant: no gradient flows into it
    assert not anchor["weight"].requires_grad


@pytest.mark.parametrize("mu,scale", [(0.01, 1.0), (0.3, 1 / 3), (1e4, 0.5)])
def test_proximal_term_gradient_is_bitwise_the_plain_formulas(mu, scale):
    """The fused autograd node adds to each gradient exactly what the per-parameter formula adds,
    beside a data loss and under a scaled loss (gradient accumulation)."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    anchor = {k: v + 0.1 * torch.randn_like(v) for k, v in net.state_dict().items()}
    x, y = torch.randn(4, 7), torch.tensor([0, 2, 1, 2])
    grads, values = [], []
    for fused in (True, False):
        net.zero_grad(set_to_none=True)
        term = ProximalTerm(anchor, mu)
        value = term(net) if fused else term.formula(net)
        ((nn.functional.cross_entropy(net(x), y) + value) * scale).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        values.append(value.detach())
    for fused, plain in zip(*grads):
        assert torch.equal(fused, plain)
    torch.testing.assert_close(values[0], values[1])


def test_proximal_term_skips_frozen_parameters():
    torch.manual_seed(2)
    net = nn.Linear(3, 2)
    anchor = {k: v + torch.randn_like(v) for k, v in net.state_dict().items()}
    net.bias.requires_grad_(False)
    value = ProximalTerm(anchor, 2.0)(net)
    hand = ((net.weight.detach() - anchor["weight"]) ** 2).sum()
    torch.testing.assert_close(value, hand)  # mu/2 = 1


def test_proximal_term_uses_the_net_of_a_lightning_style_module():
    torch.manual_seed(3)
    module = Wrapped()
    anchor = {k: v + 1.0 for k, v in module.net.state_dict().items()}  # keys of net, no prefix
    value = ProximalTerm(anchor, 0.1)(module)
    torch.testing.assert_close(value, torch.tensor(0.05 * (6 + 2)))  # every element differs by 1


def test_fedprox_configure_client_sends_global_and_regularizer():
    torch.manual_seed(4)
    glob = nn.Linear(3, 2).state_dict()
    algo = FedProx(mu=0.2)
    state = algo.init_server(glob, ctx=None)
    plan = algo.configure_client(state, 0, None)
    assert plan.weights is state["global"]
    net = nn.Linear(3, 2)
    hand = 0.1 * sum(float(((net.state_dict()[k] - glob[k]) ** 2).sum()) for k in glob)
    torch.testing.assert_close(plan.regularizer(net), torch.tensor(hand))


def test_fedprox_with_mu_zero_has_no_regularizer():
    glob = nn.Linear(3, 2).state_dict()
    plan = FedProx(mu=0.0).configure_client({"global": glob}, 0, None)
    assert plan.regularizer is None


def test_fedprox_rejects_negative_mu():
    with pytest.raises(ValueError):
        FedProx(mu=-0.1)


def test_fedprox_aggregates_like_fedavg():
    glob, a, b = seeded_states(3, seed=5)
    results = [ClientResult(0, 5, a), ClientResult(1, 15, b)]
    prox = FedProx(mu=0.5).aggregate({"global": glob}, results, ctx=None)["global"]
    avg = FedAvg().aggregate({"global": glob}, results, ctx=None)["global"]
    for k in avg:
        assert torch.equal(prox[k], avg[k])
    torch.testing.assert_close(prox["weight"], 0.25 * a["weight"] + 0.75 * b["weight"])
