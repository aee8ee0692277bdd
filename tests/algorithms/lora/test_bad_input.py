"""Uploads a rule cannot aggregate: one-line FedMoEError naming the client, the key and what differs."""

from __future__ import annotations

import pytest
import torch

from fedmoe.algorithms.lora import (
    fedex_aggregate,
    fedit_aggregate,
    fedsa_aggregate,
    ffa_aggregate,
    flora_aggregate,
    get_rule,
    hetlora_aggregate,
)
from fedmoe.errors import FedMoEError

RULES = {
    "fedit": fedit_aggregate,
    "fedex": fedex_aggregate,
    "ffa": ffa_aggregate,
    "fedsa": fedsa_aggregate,
    "flora": flora_aggregate,
    "hetlora": hetlora_aggregate,
}
EQUAL_RANK_RULES = ["fedit", "fedex", "ffa", "fedsa"]


def _inputs(kit, rule):
    layers = kit.make_layers()
    g = kit.make_global(layers)
    clients = kit.make_clients(g, layers, train_a=(rule != "ffa"))
    if rule == "ffa":
        clients = [{k: v for k, v in c.items() if "lora_A" not in k} for c in clients]
    return layers, g, clients


def _raises(fn, *args, match):
    with pytest.raises(FedMoEError, match=match) as err:
        fn(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_a_client_missing_an_adapter_key_is_named(kit, rule):
    layers, g, clients = _inputs(kit, rule)
    key = layers[1].a_key if rule == "fedsa" else layers[1].b_key  # FedSA reads only A
    del clients[2][key]
    msg = _raises(RULES[rule], g, clients, [1, 2, 3], layers, match=f"client 2's upload lacks '{key}'")
    assert f"rule '{rule}'" in msg


@pytest.mark.parametrize("rule", sorted(set(RULES) - {"fedsa"}))  # FedSA's pure function reads only A
def test_a_head_of_another_shape_is_named(kit, rule):
    layers, g, clients = _inputs(kit, rule)
    clients[1][kit.HEAD[0]] = torch.zeros(4, 5, dtype=torch.float64)
    _raises(RULES[rule], g, clients, [1, 2, 3], layers, match=r"'head.weight' has shape \(4, 5\) on client 1 but \(3, 5\) on client 0")


@pytest.mark.parametrize("rule", EQUAL_RANK_RULES)
def test_unequal_ranks_are_refused_by_rules_that_need_equal_ranks(kit, rule):
    layers, g, clients = _inputs(kit, rule)
    layer = layers[0]
    clients[1][layer.b_key] = clients[1][layer.b_key][:, :2]
    if rule != "ffa":
        clients[1][layer.a_key] = clients[1][layer.a_key][:2]
    key = layer.b_key if rule == "ffa" else layer.a_key
    msg = _raises(RULES[rule], g, clients, [1, 2, 3], layers, match="ranks differ")
    assert key in msg and "client 1" in msg and "flora or hetlora" in msg


def test_all_clients_at_another_rank_than_the_server_are_refused(kit):
    layers, g, clients = _inputs(kit, "fedex")
    for c in clients:
        for layer in layers:
            c[layer.a_key], c[layer.b_key] = c[layer.a_key][:2], c[layer.b_key][:, :2]
    _raises(fedex_aggregate, g, clients, [1, 2, 3], layers, match="on the server")


@pytest.mark.parametrize("rule", ["flora", "hetlora"])
def test_heterogeneous_rules_refuse_a_and_b_of_different_ranks(kit, rule):
    layers, g, clients = _inputs(kit, rule)
    clients[0][layers[0].a_key] = clients[0][layers[0].a_key][:2]
    _raises(RULES[rule], g, clients, [1, 2, 3], layers, match=r"client 0's adapter of layer 'lin' has A \(2, 7\) and B \(5, 3\)")


def test_hetlora_refuses_a_client_rank_above_the_global_rank(kit):
    layers, g, clients = _inputs(kit, "hetlora")
    small = {k: (v[:2] if "lora_A" in k else v[:, :2] if "lora_B" in k else v) for k, v in g.items()}
    _raises(hetlora_aggregate, small, clients, [1, 2, 3], layers, match="has rank 3 > the global rank 2")


def test_ffa_refuses_a_client_that_trained_the_frozen_a(kit):
    layers, g, clients = _inputs(kit, "ffa")
    clients[1][layers[0].a_key] = g[layers[0].a_key] + 1
    _raises(ffa_aggregate, g, clients, [1, 2, 3], layers, match=f"client 1 changed the frozen '{layers[0].a_key}'")


def test_weights_without_a_positive_sum_are_refused(kit):
    layers, g, clients = _inputs(kit, "fedit")
    _raises(fedit_aggregate, g, clients, [0, 0, 0], layers, match="positive sum")


def test_unknown_rule_name_is_one_line_listing_known_rules():
    _raises(get_rule, "fedex-lora", match="unknown aggregation rule 'fedex-lora'; known rules: .*fedex")
