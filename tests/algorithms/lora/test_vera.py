"""FedEx-VeRA: the residual identity by hand, exactness on real PEFT VeRA models (non-square
nn.Linear and GPT-2 Conv1D), what travels, and bad input."""

from __future__ import annotations

import pytest
import torch
from peft import VeraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedmoe.algorithms.base import ClientResult
from fedmoe.algorithms.fusion import num_bytes
from fedmoe.algorithms.lora.layout import to_base_layout
from fedmoe.algorithms.lora.rules import get_rule
from fedmoe.algorithms.lora.vera import FedExVeRA, fedex_vera, vera_delta
from fedmoe.errors import FedMoEError
from fedmoe.models.vera import vera_layers

SAMPLES = [3, 10, 1]
TOL = dict(rtol=1e-5, atol=1e-5)


class Lin(nn.Module):
    """Non-square nn.Linear layers 6 -> 10 -> 4 and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(6, 10), nn.Linear(10, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.l2(torch.relu(self.l1(x))))


class Gpt2Like(nn.Module):
    """GPT-2's Conv1D (weight stored d_in x d_out): 6 -> 10 -> 4, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.head = Conv1D(10, 6), Conv1D(4, 10), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c2(torch.relu(self.c1(x))))


def peft_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        net, targets, fifo = Lin(), ["l1", "l2"], False
    else:
        net, targets, fifo = Gpt2Like(), ["c1", "c2"], True
    cfg = VeraConfig(
        r=3, target_modules=targets, projection_prng_key=7, save_projection=True, modules_to_save=["head"],
        fan_in_fan_out=fifo,
    )
    return get_peft_model(net, cfg)


class Ctx:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.template = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.layers = vera_layers(model)
        self.trainable = {k for k, p in model.named_parameters() if p.requires_grad}

    def adapted_layers(self):
        return self.layers

    def trainable_keys(self):
        return set(self.trainable)

    def client_template(self):
        return self.template


def train_clients(state, algo, seed: int, samples=SAMPLES) -> list[ClientResult]:
    """Clients that moved their vectors and head away from the global ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for cid, n in enumerate(samples):
        plan = algo.configure_client(state, cid, None)
        w = {k: plan.weights[k] + 0.5 * torch.randn(plan.weights[k].shape, generator=g) for k in plan.upload_keys}
        out.append(ClientResult(client_id=cid, num_samples=n, weights=w))
    return out


def merged(model: nn.Module, weights: dict) -> dict[str, torch.Tensor]:
    """Each VeRA layer's merged weight (PEFT's own get_delta_weight), in the base layout."""
    model.load_state_dict(weights, strict=False)
    out = {}
    for layer in vera_layers(model):
        module = model.get_submodule(layer.name)
        out[layer.name] = (module.base_layer.weight + module.get_delta_weight("default")).detach().clone()
    return out


def outputs(model: nn.Module, weights: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each adapted layer's output for the same input (a layer is linear in its weight)."""
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        return {
            layer.name: model.get_submodule(layer.name)(x[:, : layer.proj_a.shape[1]]).clone()
            for layer in vera_layers(model)
        }


def test_coefficient_matches_the_hand_computed_identity():
    p = torch.tensor([0.25, 0.75], dtype=torch.float64)
    b = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    d = torch.tensor([[0.0, 4.0], [2.0, 0.0]], dtype=torch.float64)
    # b_bar = (2.5, 0.5), d_bar = (1.5, 1); C = 0.25 (-1.5, 1.5)(-1.5, 3)^T + 0.75 (0.5, -0.5)(0.5, -1)^T
    want_c = torch.tensor([[0.75, -1.5], [-0.75, 1.5]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    proj_a = torch.randn(2, 5, generator=g, dtype=torch.float64)
    proj_b = torch.randn(2, 2, generator=g, dtype=torch.float64)
    agg = fedex_vera(b, d, p, proj_a, proj_b)
    torch.testing.assert_close(agg.lambda_b, torch.tensor([2.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(agg.lambda_d, torch.tensor([1.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(agg.coefficient, want_c)
    mean_delta = sum(w * vera_delta(bi, di, proj_a, proj_b) for w, bi, di in zip(p, b, d))
    gap = mean_delta - vera_delta(agg.lambda_b, agg.lambda_d, proj_a, proj_b)
    torch.testing.assert_close(gap, (want_c * proj_b) @ proj_a)
    torch.testing.assert_close(agg.residual, gap)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_aggregate_effective_weights_and_outputs_equal_weighted_mean_of_clients(kind):
    model = peft_model(kind)
    ctx = Ctx(model)
    assert [layer.fan_in_fan_out for layer in ctx.layers] == [kind == "conv1d"] * 2
    algo = FedExVeRA()
    state = algo.init_server(ctx.template, ctx)
    p = [n / sum(SAMPLES) for n in SAMPLES]
    x = torch.randn(5, 10)
    for rnd in range(2):  # the second round starts from corrected bases
        results = train_clients(state, algo, seed=rnd)
        client_full = [{**ctx.template, **state["global"], **r.weights} for r in results]
        want = {}
        for w, full in zip(p, client_full):
            for name, t in merged(model, full).items():
                want[name] = want.get(name, 0) + w * t
        want_out = {}
        for w, full in zip(p, client_full):
            for name, t in outputs(model, full, x).items():
                want_out[name] = want_out.get(name, 0) + w * t
        state = algo.aggregate(state, results, ctx)
        got = merged(model, {**ctx.template, **state["global"]})
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
        got_out = outputs(model, {**ctx.template, **state["global"]}, x)
        for name in want_out:
            torch.testing.assert_close(got_out[name], want_out[name], **TOL)
    head = "base_model.model.head.modules_to_save.default.weight"
    torch.testing.assert_close(state["global"][head], sum(w * r.weights[head] for w, r in zip(p, results)))


def test_reference_learning_rate_scaling_is_as_inexact_as_not_folding():
    model = peft_model("linear")
    ctx = Ctx(model)
    errors = {}
    for name, scale in [("exact", 1.0), ("reference", 1e-3), ("no_fold", 0.0)]:
        algo = FedExVeRA(residual_scale=scale)
        state = algo.init_server(ctx.template, ctx)
        results = train_clients(state, algo, seed=3)
        p = [n / sum(SAMPLES) for n in SAMPLES]
        want = {}
        for w, r in zip(p, results):
            for lname, t in merged(model, {**ctx.template, **r.weights}).items():
                want[lname] = want.get(lname, 0) + w * t
        got = merged(model, {**ctx.template, **algo.aggregate(state, results, ctx)["global"]})
        base = merged(model, ctx.template)
        num = sum(float((got[k] - want[k]).norm() ** 2) for k in want) ** 0.5
        den = sum(float((want[k] - base[k]).norm() ** 2) for k in want) ** 0.5
        errors[name] = num / den
    assert errors["exact"] < 1e-5
    assert errors["no_fold"] > 0.05
    assert abs(errors["reference"] - errors["no_fold"]) < 0.01 * errors["no_fold"]


def test_uploads_are_the_vectors_and_head_and_projections_never_travel():
    model = peft_model("linear")
    ctx = Ctx(model)
    algo = get_rule("fedex_vera")()
    state = algo.init_server(ctx.template, ctx)
    plan = algo.configure_client(state, 0, None)
    assert plan.upload_keys == {
        "base_model.model.l1.vera_lambda_b.default", "base_model.model.l1.vera_lambda_d.default",
        "base_model.model.l2.vera_lambda_b.default", "base_model.model.l2.vera_lambda_d.default",
        "base_model.model.head.modules_to_save.default.weight", "base_model.model.head.modules_to_save.default.bias",
    }
    assert not any("vera_A" in k or "vera_B" in k for k in plan.weights)
    bases = {"base_model.model.l1.base_layer.weight", "base_model.model.l2.base_layer.weight"}
    assert set(plan.weights) - plan.upload_keys == bases


def test_wire_bytes_count_the_corrections_a_client_missed_in_their_smallest_form():
    model = peft_model("linear")
    ctx = Ctx(model)
    algo = FedExVeRA()
    state = algo.init_server(ctx.template, ctx)
    vectors_and_head = num_bytes({k: state["global"][k] for k in state["upload_keys"]})
    assert algo.configure_client(state, 0, None).wire_bytes == vectors_and_head
    state = algo.aggregate(state, train_clients(state, algo, seed=0, samples=[3, 10, 1]), ctx)
    # l1: d_out 10, r 3, 3 clients: rank-2 factors of C, 2 (10 + 3) = 26 < 30 = |C|;
    # l2: d_out 4: 2 (4 + 3) = 14 > 12 = |C|.
    assert algo.configure_client(state, 0, None).wire_bytes == vectors_and_head + (26 + 12) * 4
    state = algo.aggregate(state, train_clients(state, algo, seed=1, samples=[3, 10]), ctx)
    # client 2 missed round 2: two rounds of factors (52, 28) or C once (30, 12).
    assert algo.configure_client(state, 2, None).wire_bytes == vectors_and_head + (30 + 12) * 4
    # client 0 took part in round 2: only that round's rank-1 factors, 13 and 7 (< |C|).
    assert algo.configure_client(state, 0, None).wire_bytes == vectors_and_head + (13 + 7) * 4
    assert algo.round_metrics(state) == {"comm/correction_bytes": (13 + 7) * 4}


def test_uniform_weighting_takes_the_plain_mean():
    model = peft_model("linear")
    ctx = Ctx(model)
    algo = FedExVeRA(weighting="uniform")
    state = algo.init_server(ctx.template, ctx)
    results = train_clients(state, algo, seed=0)
    new = algo.aggregate(state, results, ctx)["global"]
    k = "base_model.model.l1.vera_lambda_b.default"
    torch.testing.assert_close(new[k], sum(r.weights[k] for r in results) / 3)


def test_a_single_client_changes_no_base_weight():
    model = peft_model("conv1d")
    ctx = Ctx(model)
    algo = FedExVeRA()
    state = algo.init_server(ctx.template, ctx)
    new = algo.aggregate(state, train_clients(state, algo, seed=0, samples=[5]), ctx)
    for layer in ctx.layers:
        assert torch.equal(new["global"][layer.base_key], ctx.template[layer.base_key])


def test_layer_reader_matches_peft_slicing_and_keys():
    model = peft_model("conv1d")
    keys = model.state_dict().keys()
    layers = vera_layers(model)
    assert [layer.name for layer in layers] == ["base_model.model.c1", "base_model.model.c2"]
    for layer in layers:
        assert {layer.base_key, layer.lambda_b_key, layer.lambda_d_key} <= keys
        module = model.get_submodule(layer.name)
        assert layer.proj_a.shape == (3, module.in_features) and layer.proj_b.shape == (module.out_features, 3)
        delta = vera_delta(module.vera_lambda_b["default"], module.vera_lambda_d["default"], layer.proj_a, layer.proj_b)
        torch.testing.assert_close(to_base_layout(delta, True), module.get_delta_weight("default"))


def _bad(results_fn):
    model = peft_model("linear")
    ctx = Ctx(model)
    algo = FedExVeRA()
    state = algo.init_server(ctx.template, ctx)
    results = train_clients(state, algo, seed=0)
    results_fn(results)
    with pytest.raises(FedMoEError) as err:
        algo.aggregate(state, results, ctx)
    return str(err.value)


def test_a_missing_vector_is_a_one_line_error_naming_client_and_key():
    key = "base_model.model.l2.vera_lambda_d.default"
    msg = _bad(lambda rs: rs[1].weights.pop(key))
    assert "client 1" in msg and key in msg and "\n" not in msg


def test_a_mis_shaped_vector_is_a_one_line_error_naming_both_shapes():
    key = "base_model.model.l1.vera_lambda_b.default"
    msg = _bad(lambda rs: rs[2].weights.__setitem__(key, torch.zeros(7)))
    assert key in msg and "[7]" in msg and "[10]" in msg and "\n" not in msg


def test_a_network_without_vera_layers_and_an_unknown_weighting_are_errors():
    ctx = Ctx(Lin())
    with pytest.raises(FedMoEError, match="no VeRA layers"):
        FedExVeRA().init_server(ctx.template, ctx)
    with pytest.raises(FedMoEError, match="weighting"):
        FedExVeRA(weighting="size")
