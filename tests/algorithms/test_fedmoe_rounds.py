"""Fed-MoE aggregate and sync on a real engine context: Lightning-driven prediction and gate
training over a tiny in-memory federated data set, with every fused weight recomputed by hand."""

from __future__ import annotations

import pytest
import torch

from fedmoe.algorithms import ClientResult
from fedmoe.algorithms.fedmoe import FedMoE
from fedmoe.data.federated import ArrayDataset, FederatedDataModule, FederatedSplits
from fedmoe.federation.context import EngineContext
from fedmoe.federation.runner import RunnerSettings
from fedmoe.models.classifier import Classifier
from fedmoe.models.networks import build_network

TINY_NETWORK = "test_tiny_mlp"  # registered in conftest.py
NUM_CLASSES = 3
NUM_CLIENTS = 5
SAMPLED = [4, 0, 2, 3]  # m = 4 clients, not in id order
SIZES = [5, 10, 20, 15]
K = 2
LAM = 0.1


class TinyFederated(FederatedDataModule):
    """Seeded random 8-dim inputs, 3 classes: 5 clients x 6 samples, 16 server, 12 probe, 10 val."""

    def __init__(self) -> None:
        super().__init__(num_clients=NUM_CLIENTS, batch_size=4, server_batch_size=8, eval_batch_size=5, seed=7)

    def build(self) -> FederatedSplits:
        g = torch.Generator().manual_seed(self.seed)
        n_client, n_test, n_server, n_probe, n_val, n_global_test = 6, 2, 16, 12, 10, 10
        total = NUM_CLIENTS * (n_client + n_test) + n_server + n_probe + n_val + n_global_test
        x = torch.randn(total, 8, generator=g)
        y = torch.randint(0, NUM_CLASSES, (total,), generator=g)
        cursor = 0

        def take(n: int) -> ArrayDataset:
            nonlocal cursor
            ds = ArrayDataset(x, y, torch.arange(cursor, cursor + n))
            cursor += n
            return ds

        client_train = [take(n_client) for _ in range(NUM_CLIENTS)]
        client_test = [take(n_test) for _ in range(NUM_CLIENTS)]
        return FederatedSplits(
            client_train=client_train,
            client_test=client_test,
            server_train=take(n_server),
            probe=take(n_probe),
            val=take(n_val),
            test=take(n_global_test),
            num_classes=NUM_CLASSES,
        )


def make_context(seed: int = 0) -> EngineContext:
    torch.manual_seed(seed)
    datamodule = TinyFederated()
    datamodule.setup()
    module = Classifier(network=TINY_NETWORK, num_classes=NUM_CLASSES)
    template = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    return EngineContext(module, datamodule, RunnerSettings(), template)


def client_results(template: dict[str, torch.Tensor], seed: int = 1) -> list[ClientResult]:
    """Clients that moved away from the template (floats perturbed, counters advanced)."""
    g = torch.Generator().manual_seed(seed)
    results = []
    for i, (cid, size) in enumerate(zip(SAMPLED, SIZES)):
        weights = {}
        for key, value in template.items():
            if key.endswith("num_batches_tracked"):
                weights[key] = torch.tensor(7 * (i + 1), dtype=torch.int64)
            elif key.endswith("running_var"):
                weights[key] = value * (1 + torch.rand(value.shape, generator=g))
            else:
                weights[key] = value + 0.7 * torch.randn(value.shape, generator=g)
        results.append(ClientResult(client_id=cid, num_samples=size, weights=weights))
    return results


def setup_round(seed: int = 0, **options):
    ctx = make_context(seed)
    options = {"num_routed": K, "num_main": 1, "lam": LAM, **options}
    algo = FedMoE(**options)
    state = algo.init_server(ctx.client_template(), ctx)
    return algo, ctx, state, client_results(ctx.client_template())


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def network(weights: dict[str, torch.Tensor], num_outputs: int = NUM_CLASSES) -> torch.nn.Module:
    net = build_network(TINY_NETWORK, num_outputs)
    net.load_state_dict(weights)
    return net.eval()


def inputs(dataset: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.x[dataset.index], dataset.y[dataset.index]


@torch.no_grad()
def hand_p(results: list[ClientResult], ctx: EngineContext) -> torch.Tensor:
    """P (m x n): softmax probability of the true label of each probe sample, per client."""
    x, y = inputs(ctx.probe)
    rows = [torch.softmax(network(r.weights)(x), 1)[torch.arange(len(y)), y] for r in results]
    return torch.stack(rows).double()


@torch.no_grad()
def hand_q(moe_state: dict[str, torch.Tensor], dataset: ArrayDataset) -> torch.Tensor:
    """Q (n x K): the gate's clean softmax on a data set."""
    x, _ = inputs(dataset)
    return torch.softmax(network(part(moe_state, "gate."), K)(x), 1).double()


def hand_wr(q: torch.Tensor, p: torch.Tensor, norm: str = "sum") -> torch.Tensor:
    r = torch.zeros(q.shape[1], p.shape[0], dtype=torch.float64)
    for e in range(q.shape[1]):
        for c in range(p.shape[0]):
            r[e, c] = sum(q[j, e] * p[c, j] for j in range(q.shape[0]))
            if norm == "mean":
                r[e, c] /= q[:, e].sum()
    return torch.softmax(r, dim=1)


def hand_mix(base, states, weights, base_weight):
    """base_weight * base + sum_i w_i states_i on floats; integers from base."""
    out = {}
    for key, value in base.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        acc = base_weight * value.double()
        for s, w in zip(states, weights):
            acc = acc + float(w) * s[key].double()
        out[key] = acc.float()
    return out


def assert_state_close(actual, expected, atol=1e-5):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=1e-5, msg=key)


# -- init -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["every_iteration", "pretrain_only"])
def test_init_server_starts_experts_and_main_from_the_template(schedule):
    algo, ctx, state, _ = setup_round(server_schedule=schedule)
    template = ctx.client_template()
    moe = state["moe"]
    for prefix in ("experts.0.", "experts.1.", "mains.0."):
        # also after the pretrain_only gate epoch: frozen experts keep even their BN statistics
        assert_state_close(part(moe, prefix), template, atol=0)
    assert moe["gate.fc2.weight"].shape == (K, 6)  # the gate is the client network with a K-way head
    assert moe["noise.fc2.weight"].shape == (K, 6)
    if schedule == "every_iteration":
        assert float(moe["alpha"]) == 0.5 and state["optimizer"] is None
    else:  # one epoch of gate (and alpha) training before round 1
        assert float(moe["alpha"]) != 0.5 and state["optimizer"] is not None


def test_init_server_without_common_init_gives_independent_experts():
    algo, ctx, state, _ = setup_round(common_init=False)
    template = ctx.client_template()
    e0, e1 = part(state["moe"], "experts.0."), part(state["moe"], "experts.1.")
    assert not torch.equal(e0["fc1.weight"], template["fc1.weight"])
    assert not torch.equal(e0["fc1.weight"], e1["fc1.weight"])


def test_configure_client_keeps_the_clients_own_model_without_transmitting():
    algo = FedMoE(num_routed=K)
    weights = {"w": torch.zeros(2)}
    plan = algo.configure_client({}, 3, weights)
    assert plan.weights is weights and plan.transmit is False


# -- Stage B: fusion ------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["pretrain_only", "every_iteration"])
@pytest.mark.parametrize("norm", ["sum", "mean"])
def test_moving_update_fuses_experts_by_recomputed_routing_weights(schedule, norm):
    algo, ctx, state, results = setup_round(server_schedule=schedule, relevance_norm=norm)
    before = clone(state["moe"])
    new = algo.aggregate(state, results, ctx)
    clients = [r.weights for r in results]

    w_r = hand_wr(hand_q(before, ctx.probe), hand_p(results, ctx), norm)
    assert new["stats"]["W_r"].shape == (K, len(results))
    torch.testing.assert_close(new["stats"]["W_r"].double(), w_r, atol=1e-5, rtol=1e-5)
    for e in range(K):
        expected = hand_mix(part(before, f"experts.{e}."), clients, LAM * w_r[e], 1 - LAM)
        # the server step (every_iteration) trains only the gate: the fused experts stand
        assert_state_close(part(new["moe"], f"experts.{e}."), expected)
        assert int(new["moe"][f"experts.{e}.bn.num_batches_tracked"]) == 0  # the expert's, not a client's

    shares = torch.tensor(SIZES, dtype=torch.float64) / sum(SIZES)
    expected_main = hand_mix(part(before, "mains.0."), clients, LAM * shares, 1 - LAM)
    assert_state_close(part(new["moe"], "mains.0."), expected_main)
    # the input state is not modified
    for key in before:
        assert torch.equal(state["moe"][key], before[key])


def test_the_experts_move_toward_different_clients():
    algo, ctx, state, results = setup_round(relevance_norm="sum", server_schedule="pretrain_only")
    new = algo.aggregate(state, results, ctx)
    e0, e1 = part(new["moe"], "experts.0."), part(new["moe"], "experts.1.")
    assert not torch.allclose(e0["fc1.weight"], e1["fc1.weight"])


def test_replace_and_mean_options_drop_the_old_experts():
    algo, ctx, state, results = setup_round(
        expert_update="replace", main_update="mean", server_schedule="pretrain_only"
    )
    before = clone(state["moe"])
    new = algo.aggregate(state, results, ctx)
    clients = [r.weights for r in results]
    w_r = hand_wr(hand_q(before, ctx.probe), hand_p(results, ctx))
    for e in range(K):
        expected = hand_mix(part(before, f"experts.{e}."), clients, w_r[e], 0.0)
        assert_state_close(part(new["moe"], f"experts.{e}."), expected)
    # the code's E_0 = 0.2 * sum of the 5 clients: the plain, unweighted mean
    plain = [1.0 / len(clients)] * len(clients)
    assert_state_close(part(new["moe"], "mains.0."), hand_mix(part(before, "mains.0."), clients, plain, 0.0))


def test_weighted_mean_replaces_e0_by_the_sample_weighted_mean():
    algo, ctx, state, results = setup_round(main_update="weighted_mean", server_schedule="pretrain_only")
    before = clone(state["moe"])
    new = algo.aggregate(state, results, ctx)
    shares = torch.tensor(SIZES, dtype=torch.float64) / sum(SIZES)
    expected = hand_mix(part(before, "mains.0."), [r.weights for r in results], shares, 0.0)
    assert_state_close(part(new["moe"], "mains.0."), expected)


def test_every_main_expert_is_updated_like_e0():
    algo, ctx, state, results = setup_round(num_main=2, server_schedule="pretrain_only", common_init=False)
    before = clone(state["moe"])
    new = algo.aggregate(state, results, ctx)
    shares = torch.tensor(SIZES, dtype=torch.float64) / sum(SIZES)
    for i in range(2):
        expected = hand_mix(part(before, f"mains.{i}."), [r.weights for r in results], LAM * shares, 1 - LAM)
        assert_state_close(part(new["moe"], f"mains.{i}."), expected)


def test_main_epochs_train_the_main_expert_alone_on_server_data():
    torch.manual_seed(0)
    algo, ctx, state, results = setup_round(main_update="mean", server_schedule="pretrain_only")
    fused = algo.aggregate(state, results, ctx)
    torch.manual_seed(0)
    algo, ctx, state, results = setup_round(
        main_update="mean", server_schedule="pretrain_only", main_epochs=3, main_lr=1e-2
    )
    trained = algo.aggregate(state, results, ctx)
    mains = [k for k in fused["moe"] if k.startswith("mains.0.") and fused["moe"][k].is_floating_point()]
    assert any(not torch.equal(fused["moe"][k], trained["moe"][k]) for k in mains)
    for k in fused["moe"]:
        if k.startswith("experts."):
            assert torch.equal(fused["moe"][k], trained["moe"][k]), k
    moe = algo._module.moe
    assert not moe.mains[0].training and not any(p.requires_grad for p in moe.mains[0].parameters())


# -- the server step ------------------------------------------------------------------------------


def gate_parameter_change(gate_value: str) -> tuple[float, float]:
    algo, ctx, state, results = setup_round(gate_value=gate_value, server_weight_decay=0.0)
    before = clone(state["moe"])
    new = algo.aggregate(state, results, ctx)
    names = [n for n, _ in build_network(TINY_NETWORK, K).named_parameters()]
    change = torch.cat([(new["moe"][f"gate.{n}"] - before[f"gate.{n}"]).abs().flatten() for n in names])
    return float(change.mean()), float(new["moe"]["alpha"] - before["alpha"])


def test_server_step_trains_the_gate_and_alpha_with_probability_gates():
    gate_change, alpha_change = gate_parameter_change("probability")
    assert gate_change > 0 and alpha_change != 0
    # Adam moves a parameter by about lr per step where cross-entropy reaches it; with
    # renormalised top-1 gates (value exactly 1) only the 1e-7 L2 term does, far less
    renormalised_change, _ = gate_parameter_change("renormalised")
    assert gate_change > 3 * renormalised_change


def test_server_step_is_skipped_each_round_with_pretrain_only():
    algo, ctx, state, results = setup_round(server_schedule="pretrain_only")
    before = clone(state["moe"])
    new = algo.aggregate(state, results, ctx)
    for key in before:
        if key.startswith(("gate.", "noise.")) or key == "alpha":
            assert torch.equal(new["moe"][key], before[key]), key


# -- Stage C: sync --------------------------------------------------------------------------------


def expected_sync(new_state, results, w_c, keep, main_prefixes=("mains.0.",)):
    experts = [part(new_state["moe"], f"experts.{e}.") for e in range(K)]
    if main_prefixes:
        mains = [part(new_state["moe"], p) for p in main_prefixes]
        main = hand_mix(mains[0], mains, [1 / len(mains)] * len(mains), 0.0)
        experts = [main, *experts]
    return {
        r.client_id: hand_mix(r.weights, experts, (1 - keep) * w_c[:, i].double(), keep)
        for i, r in enumerate(results)
    }


def test_sync_mixes_each_client_with_the_experts_by_its_column_of_w_c():
    algo, ctx, state, results = setup_round()
    new = algo.aggregate(state, results, ctx)
    w_c = new["stats"]["W_c"]
    assert w_c.shape == (K + 1, len(results))
    synced = algo.sync(new, results, ctx)
    assert list(synced) == SAMPLED
    expected = expected_sync(new, results, w_c, keep=LAM)
    for i, r in enumerate(results):
        assert_state_close(synced[r.client_id], expected[r.client_id])
        # the client keeps its own counter
        assert int(synced[r.client_id]["bn.num_batches_tracked"]) == 7 * (i + 1)
    # clients get different models (different columns of W_c, different own models)
    assert not torch.allclose(synced[4]["fc1.weight"], synced[0]["fc1.weight"])


def test_w_c_uses_the_updated_gate_and_alpha():
    # large server learning rates so that the updated gate clearly differs from the old one
    algo, ctx, state, results = setup_round(gate_lr=0.05, alpha_lr=0.05)
    before = clone(state["moe"])
    new = algo.aggregate(state, results, ctx)
    p = hand_p(results, ctx)

    def hand_wc(moe_state):
        q = hand_q(moe_state, ctx.probe)
        s = q.t() @ p.t()  # K x m, sum normalisation
        alpha = float(moe_state["alpha"])
        stacked = torch.cat([torch.full((1, s.shape[1]), 1 - alpha, dtype=s.dtype), alpha * s])
        return torch.softmax(stacked, dim=0)

    torch.testing.assert_close(new["stats"]["W_c"].double(), hand_wc(new["moe"]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(new["stats"]["W_c"].double(), hand_wc(before), atol=1e-4)
    torch.testing.assert_close(new["stats"]["W_c"].sum(0), torch.ones(len(results)))


def test_client_update_replace_gives_exactly_the_expert_mixture():
    algo, ctx, state, results = setup_round(client_update="replace")
    new = algo.aggregate(state, results, ctx)
    synced = algo.sync(new, results, ctx)
    expected = expected_sync(new, results, new["stats"]["W_c"], keep=0.0)
    for i, r in enumerate(results):
        assert_state_close(synced[r.client_id], expected[r.client_id])
        assert int(synced[r.client_id]["bn.num_batches_tracked"]) == 7 * (i + 1)


def test_sync_without_a_main_expert_uses_only_the_routed_experts():
    algo, ctx, state, results = setup_round(num_main=0)
    new = algo.aggregate(state, results, ctx)
    w_c = new["stats"]["W_c"]
    assert w_c.shape == (K, len(results))
    synced = algo.sync(new, results, ctx)
    expected = expected_sync(new, results, w_c, keep=LAM, main_prefixes=())
    for r in results:
        assert_state_close(synced[r.client_id], expected[r.client_id])


def test_sync_with_two_mains_uses_their_mean_as_e0():
    algo, ctx, state, results = setup_round(num_main=2, common_init=False)
    new = algo.aggregate(state, results, ctx)
    assert new["stats"]["W_c"].shape == (K + 1, len(results))
    synced = algo.sync(new, results, ctx)
    expected = expected_sync(new, results, new["stats"]["W_c"], keep=LAM, main_prefixes=("mains.0.", "mains.1."))
    for r in results:
        assert_state_close(synced[r.client_id], expected[r.client_id])


# -- server model and metrics ---------------------------------------------------------------------


def test_server_module_returns_logits_of_the_mixture():
    algo, ctx, state, results = setup_round()
    new = algo.aggregate(state, results, ctx)
    module = algo.server_module(new, ctx).eval()
    x, _ = inputs(ctx.datamodule.splits.test)
    with torch.no_grad():
        logits = module(x)
    assert logits.shape == (len(x), NUM_CLASSES)
    # by hand: alpha * g * E_top(x) + (1 - alpha) * E_0(x), with g the top-1 gate probability
    alpha = float(new["moe"]["alpha"])
    with torch.no_grad():
        probs = hand_q(new["moe"], ctx.datamodule.splits.test).float()
        experts = torch.stack([network(part(new["moe"], f"experts.{e}."))(x) for e in range(K)], 1)
        main = network(part(new["moe"], "mains.0."))(x)
    top = probs.argmax(1)
    routed = probs.gather(1, top.unsqueeze(1)) * experts[torch.arange(len(x)), top]
    torch.testing.assert_close(logits, alpha * routed + (1 - alpha) * main, atol=1e-5, rtol=1e-5)


def test_round_metrics_report_alpha_utilisation_and_matrices():
    algo, ctx, state, results = setup_round()
    new = algo.aggregate(state, results, ctx)
    metrics = algo.round_metrics(new)
    assert metrics["fedmoe/alpha"] == pytest.approx(float(new["moe"]["alpha"]))
    assert metrics["fedmoe/alpha"] != 0.5  # alpha trained in the server step
    utilisation = [metrics[f"fedmoe/utilisation/expert_{e + 1}"] for e in range(K)]
    assert sum(utilisation) == pytest.approx(1.0)
    top = hand_q(new["moe"], ctx.val).argmax(1)
    assert utilisation == pytest.approx([float((top == e).float().mean()) for e in range(K)])
    for key in ("fedmoe/gate_entropy", "fedmoe/label_entropy"):
        assert isinstance(metrics[key], float)
    w_r, w_c = metrics["fedmoe/W_r"], metrics["fedmoe/W_c"]
    assert isinstance(w_r, torch.Tensor) and w_r.dim() == 2 and w_r.shape == (K, len(results))
    assert isinstance(w_c, torch.Tensor) and w_c.dim() == 2 and w_c.shape == (K + 1, len(results))
    torch.testing.assert_close(w_r.sum(1), torch.ones(K))
    torch.testing.assert_close(w_c.sum(0), torch.ones(len(results)))


def test_round_metrics_of_a_fresh_state_are_empty():
    algo, ctx, state, _ = setup_round()
    assert algo.round_metrics(state) == {}


def test_aggregate_leaves_the_frozen_experts_in_eval_mode():
    # ServerMoEModule promises that frozen experts and mains always stay in eval mode (so that a
    # forward in training mode never moves their BatchNorm statistics)
    algo, ctx, state, results = setup_round()
    new = algo.aggregate(state, results, ctx)
    moe = algo.server_module(new, ctx).moe
    assert not any(m.training for m in [*moe.experts, *moe.mains])


# -- the released code's options and the fixed defects --------------------------------------------


def test_lambda_is_applied_at_every_iteration():
    # pretrain_only: the gate, hence W_r, is the same at both iterations
    algo, ctx, state, results = setup_round(iterations=2, server_schedule="pretrain_only", keep_best_iteration=False)
    before = clone(state["moe"])
    new = algo.aggregate(state, results, ctx)
    w_r = hand_wr(hand_q(before, ctx.probe), hand_p(results, ctx))
    kept = (1 - LAM) ** 2  # 0.81: two moving steps move the experts 19%, not 10%
    for e in range(K):
        expected = hand_mix(part(before, f"experts.{e}."), [r.weights for r in results], (1 - kept) * w_r[e], kept)
        assert_state_close(part(new["moe"], f"experts.{e}."), expected)


def test_alpha_and_main_get_no_weight_decay():
    algo, ctx, state, _ = setup_round(
        train_experts_on_server=True, expert_lr=2e-3, main_server_lr=3e-4, alpha_lr=7e-6, gate_lr=1e-3
    )
    groups = {g["name"]: g for g in algo._module.configure_optimizers().param_groups}
    assert {n: g["lr"] for n, g in groups.items()} == {"gate": 1e-3, "alpha": 7e-6, "experts": 2e-3, "mains": 3e-4}
    assert {n: g["weight_decay"] for n, g in groups.items()} == {"gate": 5e-4, "alpha": 0.0, "experts": 5e-4, "mains": 0.0}
    assert {n: g["eps"] for n, g in groups.items()} == {"gate": 1e-6, "alpha": 1e-8, "experts": 1e-6, "mains": 1e-8}


def test_train_noise_false_leaves_the_noise_net_untrained():
    algo, ctx, state, results = setup_round(train_noise=False, gate_lr=0.05)
    before = clone(state["moe"])
    new = algo.aggregate(state, results, ctx)
    # parameters stand; BatchNorm statistics still follow the batches, as in the code (train mode)
    noise = [f"noise.{n}" for n, _ in build_network(TINY_NETWORK, K).named_parameters()]
    assert noise and all(torch.equal(new["moe"][k], before[k]) for k in noise)
    assert not torch.equal(new["moe"]["gate.fc1.weight"], before["gate.fc1.weight"])


def test_server_lr_schedule_scales_each_server_step():
    algo, ctx, state, results = setup_round(server_lr_schedule="cosine", server_lr_period=2, gate_lr=1e-3, alpha_lr=1e-2)
    first = algo.aggregate(state, results, ctx)
    lrs = {g["name"]: g["lr"] for g in first["optimizer"]["param_groups"]}
    assert lrs == pytest.approx({"gate": 1e-3, "alpha": 1e-2}) and first["server_fits"] == 1
    second = algo.aggregate(first, results, ctx)  # fit 1 of a period of 2: (1 + cos(pi / 2)) / 2
    lrs = {g["name"]: g["lr"] for g in second["optimizer"]["param_groups"]}
    assert lrs == pytest.approx({"gate": 5e-4, "alpha": 5e-3}) and second["server_fits"] == 2


def scripted_validation(ctx, losses):
    """Make ``ctx.evaluate`` on the validation set return ``losses`` in turn; record the MoE states."""
    seen, real = [], ctx.evaluate

    def evaluate(module, dataset):
        out = real(module, dataset)
        if dataset is ctx.val and len(seen) < len(losses):
            seen.append(clone(module.moe.state_dict()))
            out = {**out, "loss": losses[len(seen) - 1]}
        return out

    ctx.evaluate = evaluate
    return seen


@pytest.mark.parametrize("keep", [True, False])
def test_keep_best_iteration_reverts_or_records(keep):
    algo, ctx, state, results = setup_round(iterations=2, keep_best_iteration=keep)
    seen = scripted_validation(ctx, [0.5, 0.9])  # iteration 1 is the better one
    new = algo.aggregate(state, results, ctx)
    assert len(seen) == 2 and not torch.equal(seen[0]["experts.0.fc1.weight"], seen[1]["experts.0.fc1.weight"])
    if keep:  # Algorithm 1: continue from the best iteration
        assert_state_close(new["moe"], seen[0], atol=0)
        assert "best" not in new and algo.best_module(new, ctx) is None
    else:  # the code: continue from the last iteration, record the best
        assert_state_close(new["moe"], seen[1], atol=0)
        assert new["best"]["val_loss"] == 0.5 and new["best"]["iteration"] == 1 and new["best"]["round"] == 1
        assert_state_close(new["best"]["moe"], seen[0], atol=0)
        assert_state_close(algo.best_module(new, ctx).moe.state_dict(), seen[0], atol=0)


def test_server_val_metrics_are_those_of_the_returned_model():
    algo, ctx, state, results = setup_round(iterations=2)
    assert algo.server_val_metrics(state) is None
    new = algo.aggregate(state, results, ctx)
    again = ctx.evaluate(algo.server_module(new, ctx), ctx.val)
    cached = algo.server_val_metrics(new)
    assert cached.keys() == again.keys()
    for key in again:
        assert cached[key] == pytest.approx(again[key], abs=1e-6), key


def test_server_sgd_with_momentum_over_the_same_groups_and_rates():
    ctx = make_context()
    algo = FedMoE(num_routed=K, num_main=1, server_optimizer="sgd", server_momentum=0.9, gate_lr=5e-3,
                  alpha_lr=1e-5, server_weight_decay=0.0, train_experts_on_server=True, expert_lr=5e-4)
    opt = algo._build(ctx).configure_optimizers()
    assert type(opt) is torch.optim.SGD
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["gate"]["lr"] == 5e-3 and groups["experts"]["lr"] == 5e-4
    assert all(g["momentum"] == 0.9 and "eps" not in g for g in opt.param_groups)
    assert type(FedMoE(num_routed=K)._build(ctx).configure_optimizers()) is torch.optim.Adam


def test_gate_network_kwargs_build_a_gate_smaller_than_the_experts():
    from torch import nn

    from fedmoe.models.networks import NETWORKS, register_network

    if "test_sized_gate" not in NETWORKS:
        @register_network("test_sized_gate")
        class SizedGate(nn.Sequential):
            def __init__(self, num_classes: int, hidden: int = 6) -> None:
                super().__init__(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    ctx = make_context()
    moe = FedMoE(num_routed=K, gate_network="test_sized_gate", gate_network_kwargs={"hidden": 3})._build(ctx).moe
    assert moe.gate[0].out_features == 3 and moe.noise[0].out_features == 3 and moe.gate[2].out_features == K
    with pytest.raises(Exception, match="gate_network_kwargs must be a mapping"):
        FedMoE(num_routed=K, gate_network_kwargs=[3])
