"""The rules behind the Algorithm protocol: the federated subset, what each rule sends and
receives (keys and exact bytes), personal tensors, fresh adapters, the registry and options."""

from __future__ import annotations

import pytest
import torch

from fedmoe.algorithms.base import ClientResult
from fedmoe.algorithms.fusion import num_bytes
from fedmoe.algorithms.lora import FFALoRA, FLoRA, FedExLoRA, FedIT, FedSALoRA, HetLoRA, get_rule
from fedmoe.algorithms.lora.common import factor_bytes
from fedmoe.algorithms.lora.flora import fresh_lora_a
from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.errors import FedMoEError

OTHER = "frozen.other.weight"


def _setup(kit, algo, layers=None, r=3):
    layers = layers or kit.make_layers(r=r)
    g = kit.make_global(layers, r=r)
    template = {**g, OTHER: torch.ones(2, 2, dtype=torch.float64)}
    trainable = {k for layer in layers for k in (layer.a_key, layer.b_key)} | set(kit.HEAD)
    ctx = kit.FakeContext(layers, template, trainable)
    return algo.init_server(template, ctx), ctx, layers, template


def _train(kit, state, algo, ids, layers, seed=0, samples=None, keep_a=False):
    """Each client loads its plan and returns perturbed upload keys (A kept when frozen)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, cid in enumerate(ids):
        plan = algo.configure_client(state, cid, None)
        w, kept = {}, {}
        for k in plan.upload_keys | plan.keep_keys:
            v = plan.weights[k]
            new = v.clone() if (keep_a and "lora_A" in k) else v + torch.randn(v.shape, generator=gen, dtype=v.dtype)
            (kept if k in plan.keep_keys else w)[k] = new
        out.append(ClientResult(client_id=cid, num_samples=(samples or [2, 5, 1, 4])[i], weights=w, kept=kept))
    return out


def test_registry_gives_each_rule_and_lists_the_known_ones_for_an_unknown_name():
    assert get_rule("fedex") is FedExLoRA and get_rule("hetlora") is HetLoRA and get_rule("fedit") is FedIT
    with pytest.raises(FedMoEError, match="unknown aggregation rule 'fedavgx'; known rules: ") as err:
        get_rule("fedavgx")
    listed = str(err.value).split("known rules: ")[1].split(", ")
    assert {"fedex", "fedit", "fedsa", "ffa", "flora", "hetlora"} <= set(listed) and listed == sorted(listed)


def test_global_state_holds_only_the_federated_subset(kit):
    state, _, layers, _ = _setup(kit, FedIT())
    assert set(state["global"]) == {k for l in layers for k in (l.a_key, l.b_key)} | set(kit.HEAD)
    state, _, layers, _ = _setup(kit, FedExLoRA())
    assert set(state["global"]) == {k for l in layers for k in (l.a_key, l.b_key, l.base_key)} | set(kit.HEAD)
    assert OTHER not in state["global"]


def test_server_module_loads_the_subset_over_the_common_initial_weights(kit):
    algo = FedExLoRA()
    state, ctx, _, template = _setup(kit, algo)
    algo.server_module(state, ctx)
    assert set(ctx.loaded) == set(template) and ctx.loaded[OTHER] is template[OTHER]


def test_fedit_round_uploads_and_downloads_adapters_and_head(kit):
    algo = FedIT(weighting="uniform")
    state, ctx, layers, _ = _setup(kit, algo)
    plan = algo.configure_client(state, 0, None)
    assert plan.upload_keys == frozenset(state["global"]) and plan.wire_bytes is None
    res = _train(kit, state, algo, [0, 1], layers)
    assert algo.upload_bytes(res[0]) == num_bytes(res[0].weights)
    new = algo.aggregate(state, res, ctx)
    for k in new["global"]:
        torch.testing.assert_close(new["global"][k], (res[0].weights[k] + res[1].weights[k]) / 2)


def test_fedex_sends_base_weights_but_counts_only_the_missed_residuals(kit):
    """Wire bytes: adapters + head, plus per layer the residuals since the client's last base, as
    factors of their summed rank or dense, whichever is smaller."""
    layer = LoRALayer("big", "big.base_layer.weight", "big.lora_A.default.weight", "big.lora_B.default.weight", 2.0)
    kit.DIMS["big"] = (40, 48)
    try:
        algo = FedExLoRA()
        state, ctx, layers, _ = _setup(kit, algo, layers=[layer], r=2)
        adapters_head = num_bytes({k: v for k, v in state["global"].items() if k != layer.base_key})
        plan = algo.configure_client(state, 0, None)
        assert layer.base_key in plan.weights and layer.base_key not in plan.upload_keys
        assert plan.wire_bytes == adapters_head  # round 1: the initial base is common
        state = algo.aggregate(state, _train(kit, state, algo, [0, 1, 2], layers, seed=1), ctx)
        assert state["info"]["rank"]["big"] == 4 and state["info"]["factors"]["big"]
        factors = 4 * (40 + 48) * 8
        assert algo.configure_client(state, 0, None).wire_bytes == adapters_head + factors
        state = algo.aggregate(state, _train(kit, state, algo, [0, 1, 2], layers, seed=2), ctx)
        assert algo.configure_client(state, 1, None).wire_bytes == adapters_head + factors
        # client 3 never took part: it misses both residuals, rank 8 -> 8 * 88 < 40 * 48
        assert algo.configure_client(state, 3, None).wire_bytes == adapters_head + 2 * factors
        assert algo.round_metrics(state)["lora/residual_rank"] == 4
    finally:
        del kit.DIMS["big"]


def test_wire_form_is_dense_when_factors_are_larger():
    assert factor_bytes(6, 5, 7, 4) == (35 * 4, False)  # 6 * 12 = 72 > 35
    assert factor_bytes(4, 40, 48, 4) == (4 * 88 * 4, True)
    assert factor_bytes(0, 40, 48, 4) == (0, True)


def test_ffa_freezes_a_never_uploads_it_and_sends_it_only_in_a_clients_first_round(kit):
    algo = FFALoRA()
    state, ctx, layers, _ = _setup(kit, algo)
    a_keys = {l.a_key for l in layers}
    assert algo.frozen_keys(ctx) == a_keys
    plan = algo.configure_client(state, 0, None)
    assert not (plan.upload_keys & a_keys)
    b_head = num_bytes({k: state["global"][k] for k in plan.upload_keys})
    a_bytes = num_bytes({k: state["global"][k] for k in a_keys})
    assert plan.wire_bytes == b_head + a_bytes
    res = _train(kit, state, algo, [0, 1], layers, keep_a=True)
    assert algo.upload_bytes(res[0]) == b_head
    new = algo.aggregate(state, res, ctx)
    for k in a_keys:
        assert torch.equal(new["global"][k], state["global"][k])
    assert algo.configure_client(new, 0, None).wire_bytes == b_head
    assert algo.configure_client(new, 2, None).wire_bytes == b_head + a_bytes


def test_fedsa_personal_b_and_head_never_uploaded_never_changed_by_the_server(kit):
    algo = FedSALoRA()
    state, ctx, layers, _ = _setup(kit, algo)
    a_keys = [l.a_key for l in layers]
    personal = [l.b_key for l in layers] + list(kit.HEAD)
    res = _train(kit, state, algo, [0, 1, 2], layers, seed=4)
    for r in res:
        assert set(r.weights) == set(a_keys) and set(r.kept) == set(personal)
        assert algo.upload_bytes(r) == num_bytes({k: r.weights[k] for k in a_keys})
    new = algo.aggregate(state, res, ctx)
    synced = algo.sync(new, res, ctx)
    p = [2 / 8, 5 / 8, 1 / 8]
    for k in a_keys:
        torch.testing.assert_close(new["global"][k], sum(w * r.weights[k] for w, r in zip(p, res)))
    for r in res:
        for k in personal:
            assert synced[r.client_id][k] is r.kept[k]
        for k in a_keys:
            assert synced[r.client_id][k] is new["global"][k]
    # next round: global A with the client's own B and head; only A travels
    plan = algo.configure_client(new, 1, synced[1])
    for k in personal:
        assert plan.weights[k] is synced[1][k]
    assert plan.wire_bytes == num_bytes({k: new["global"][k] for k in a_keys})
    # a client never sampled starts from the common initial B and head
    fresh = algo.configure_client(new, 7, ctx.client_template())
    for k in personal:
        assert torch.equal(fresh.weights[k], ctx.client_template()[k])
    assert algo.personalised


def test_flora_restarts_with_zero_b_and_a_drawn_from_seed_and_round(kit):
    algo = FLoRA(seed=3)
    state, ctx, layers, _ = _setup(kit, algo)
    res = _train(kit, state, algo, [0, 1], layers)
    new = algo.aggregate(state, res, ctx)
    again = FLoRA(seed=3).aggregate(state, res, ctx)
    for l in layers:
        assert not new["global"][l.b_key].any()
        assert torch.equal(new["global"][l.a_key], again["global"][l.a_key])
        assert not torch.equal(new["global"][l.a_key], state["global"][l.a_key])
        bound = (1.0 / new["global"][l.a_key].shape[1]) ** 0.5  # kaiming-uniform(a=sqrt(5)): 1/sqrt(fan_in)
        assert new["global"][l.a_key].abs().max() <= bound
    nxt = fresh_lora_a(layers, state["global"], 3, 2)
    assert not torch.equal(nxt[layers[0].a_key], new["global"][layers[0].a_key])
    before = torch.get_rng_state()
    fresh_lora_a(layers, state["global"], 3, 1)
    assert torch.equal(before, torch.get_rng_state())


def test_flora_heterogeneous_ranks_send_zero_tails_and_count_only_rank_r_k(kit):
    algo = FLoRA(client_ranks=[1, 3])
    state, ctx, layers, _ = _setup(kit, algo)
    plan = algo.configure_client(state, 0, None)
    for l in layers:
        assert not plan.weights[l.a_key][1:].any() and torch.equal(plan.weights[l.a_key][:1], state["global"][l.a_key][:1])
    res = _train(kit, state, algo, [0, 1], layers)
    head = num_bytes({k: res[0].weights[k] for k in kit.HEAD})
    want = head + sum((kit.DIMS[l.name][0] + kit.DIMS[l.name][1]) * 8 for l in layers)
    assert algo.upload_bytes(res[0]) == want
    new = algo.aggregate(state, res, ctx)
    assert new["info"]["rank"][layers[0].name] == 1 + 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: HetLoRA(min_rank=0), "federation.algorithm.init_args.min_rank must be >= 1, got 0"),
        (lambda: HetLoRA(prune_gamma=1.0), "federation.algorithm.init_args.prune_gamma must be in (0, 1), got 1.0"),
        (lambda: HetLoRA(prune_lambda=-1), "federation.algorithm.init_args.prune_lambda must be >= 0, got -1"),
        (lambda: HetLoRA(min_rank=4, max_rank=2), "federation.algorithm.init_args.max_rank must be >= min_rank=4, got 2"),
        (lambda: FLoRA(client_ranks=[2, 0]), "federation.algorithm.init_args.client_ranks must be a non-empty list"),
        (lambda: FedIT(weighting="mean"), "federation.algorithm.init_args.weighting must be 'samples' or 'uniform'"),
    ],
)
def test_bad_options_name_the_option(make, message):
    with pytest.raises(FedMoEError) as err:
        make()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_hetlora_rank_above_the_adapter_rank_is_refused_at_setup(kit):
    with pytest.raises(FedMoEError, match=r"client_ranks asks for rank 5, above the adapters' rank 3"):
        _setup(kit, HetLoRA(client_ranks=[2, 5]))


def test_a_model_without_lora_adapters_is_refused(kit):
    ctx = kit.FakeContext([], {}, set())
    with pytest.raises(FedMoEError, match="rule 'fedex' aggregates LoRA adapters"):
        FedExLoRA().init_server({}, ctx)
