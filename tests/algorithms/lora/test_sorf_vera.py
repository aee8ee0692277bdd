"""SORF-VeRA: the parametrisation's pieces against their definitions, the reference's lossy refit
against our exact fold, and the rule on real SORF-VeRA layers (non-square nn.Linear, GPT-2 Conv1D)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedmoe.algorithms.base import ClientResult
from fedmoe.algorithms.fusion import num_bytes
from fedmoe.algorithms.lora import sorf_vera as sv
from fedmoe.algorithms.lora.rules import get_rule
from fedmoe.errors import FedMoEError
from fedmoe.models.sorf_vera import SORFVeRAConfig, apply_sorf_vera, sorf_vera_layers

F64 = torch.float64
SAMPLES = [3, 10, 1]


def _givens(r: int, p: int, q: int, t: float) -> torch.Tensor:
    g = torch.eye(r, dtype=F64)
    g[p, p] = g[q, q] = math.cos(t)
    g[p, q], g[q, p] = -math.sin(t), math.sin(t)
    return g


# -- the parametrisation ----------------------------------------------------------------------------


def test_hadamard_is_the_normalised_sylvester_matrix():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64)
    torch.testing.assert_close(sv.hadamard(4), torch.kron(h2, h2) / 2)
    with pytest.raises(ValueError):
        sv.hadamard(6)


@pytest.mark.parametrize("d_out", [8, 10, 12])
def test_sorf_matrix_is_orthonormal_and_set_by_its_seed(d_out):
    s = sv.sorf_matrix(d_out, seed=42, dtype=F64)
    torch.testing.assert_close(s @ s.T, torch.eye(d_out, dtype=F64))
    assert torch.equal(s, sv.sorf_matrix(d_out, seed=42, dtype=F64))
    assert not torch.allclose(s, sv.sorf_matrix(d_out, seed=43, dtype=F64))
    assert sv.power2_partition(d_out) == [1 << b for b in range(8, -1, -1) if d_out >> b & 1]


def test_sorf_block_is_signs_hadamard_signs_hadamard_signs():
    gen = torch.Generator().manual_seed(5)
    d1, d2, d3 = (2.0 * torch.randint(0, 2, (4,), generator=gen).to(F64) - 1 for _ in range(3))
    h = sv.hadamard(4)
    torch.testing.assert_close(sv.sorf_block(4, 5), torch.diag(d1) @ h @ torch.diag(d2) @ h @ torch.diag(d3))


def test_gamma_blocks_and_its_batched_transpose():
    a, c = torch.tensor([2.0, 3.0], dtype=F64), torch.tensor([0.5, -1.0], dtype=F64)
    want = torch.tensor(
        [[2.0, -0.5, 0, 0], [0.5, 2.0, 0, 0], [0, 0, 3.0, 1.0], [0, 0, -1.0, 3.0]], dtype=F64
    )
    torch.testing.assert_close(sv.gamma(a, c), want)
    h = torch.randn(2, 3, 4, dtype=F64)
    torch.testing.assert_close(sv.apply_gamma(h, a, c), h @ want.T)


def test_rotation_is_the_product_of_givens_rotations_in_the_reference_order():
    angles = torch.tensor([0.3, -0.7, 1.1], dtype=F64)  # planes (0,1), (0,2), (1,2)
    want = _givens(3, 0, 1, 0.3) @ _givens(3, 0, 2, -0.7) @ _givens(3, 1, 2, 1.1)
    torch.testing.assert_close(sv.rotation(angles, 3), want)
    torch.testing.assert_close(sv.lambda_d(torch.tensor(0.5, dtype=F64), angles, 3), 0.5 * want)
    assert sv.givens_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


@pytest.mark.parametrize("path", ["tree", "fans"])
def test_both_ways_of_building_the_rotation_give_the_ordered_product(path, monkeypatch):
    monkeypatch.setattr(sv, "_TREE_MAX_RANK", 16 if path == "tree" else 1)
    angles = torch.randn(15, dtype=F64, generator=torch.Generator().manual_seed(2))
    angles[4] = math.pi / 2  # a zero cosine inside the fans' products
    want = torch.eye(6, dtype=F64)
    for (p, q), t in zip(sv.givens_pairs(6), angles.tolist()):
        want = want @ _givens(6, p, q, t)
    a = angles.clone().requires_grad_(True)
    got = sv.rotation(a, 6)
    torch.testing.assert_close(got, want)
    got.pow(3).sum().backward()
    b = angles.clone().requires_grad_(True)
    chain = torch.eye(6, dtype=F64)
    for idx, (p, q) in enumerate(sv.givens_pairs(6)):
        g = torch.eye(6, dtype=F64).index_put(
            (torch.tensor([p, p, q, q]), torch.tensor([p, q, p, q])),
            torch.stack([torch.cos(b[idx]), -torch.sin(b[idx]), torch.sin(b[idx]), torch.cos(b[idx])]),
        )
        chain = chain @ g
    chain.pow(3).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_rotation_angles_invert_rotation_and_gradients_reach_the_angles():
    angles = torch.randn(10, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.5
    g = sv.rotation(angles, 5)
    torch.testing.assert_close(sv.rotation(sv.rotation_angles(g), 5), g)
    a = angles.clone().requires_grad_(True)
    sv.rotation(a, 5).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_nearest_scaled_rotation_recovers_a_scaled_rotation_and_keeps_det_positive():
    angles = torch.tensor([0.2, -0.4, 0.9], dtype=F64)
    scale, got = sv.nearest_scaled_rotation(1.7 * sv.rotation(angles, 3))
    torch.testing.assert_close(scale, torch.tensor(1.7, dtype=F64))
    torch.testing.assert_close(sv.rotation(got, 3), sv.rotation(angles, 3))
    reflection = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64))
    scale, got = sv.nearest_scaled_rotation(reflection)
    assert torch.det(sv.rotation(got, 3)) > 0 and float(scale) == pytest.approx(1 / 3)


def test_fit_b_is_the_per_block_least_squares_solution():
    g = torch.Generator().manual_seed(1)
    s = sv.sorf_matrix(6, 3, dtype=F64)
    proj_b = torch.randn(6, 4, generator=g, dtype=F64)
    left = torch.randn(6, 4, generator=g, dtype=F64)
    b_real, b_imag = sv.fit_b(s, proj_b, left)
    target = torch.linalg.solve(s, left)
    for j in range(3):
        b0, b1 = proj_b[2 * j], proj_b[2 * j + 1]
        system = torch.stack([torch.stack([b0, b1], 1).reshape(-1), torch.stack([-b1, b0], 1).reshape(-1)], 1)
        rhs = torch.stack([target[2 * j], target[2 * j + 1]], 1).reshape(-1)
        ac = torch.linalg.lstsq(system, rhs).solution
        torch.testing.assert_close(torch.stack([b_real[j], b_imag[j]]), ac)


# -- aggregation of one layer -----------------------------------------------------------------------


def _clients(m: int, d_out: int, r: int, train_b: bool, seed: int = 0) -> list[sv.SORFParams]:
    g = torch.Generator().manual_seed(seed)
    k = d_out // 2
    out = []
    for _ in range(m):
        b_real = torch.ones(k, dtype=F64) + (0.2 * torch.randn(k, generator=g, dtype=F64) if train_b else 0)
        b_imag = 0.2 * torch.randn(k, generator=g, dtype=F64) if train_b else torch.zeros(k, dtype=F64)
        scale = 0.1 + 0.05 * torch.randn((), generator=g, dtype=F64)
        out.append(sv.SORFParams(b_real, b_imag, scale, 0.3 * torch.randn(sv.num_angles(r), generator=g, dtype=F64)))
    return out


def _pieces(d_out: int, d_in: int, r: int):
    g = torch.Generator().manual_seed(9)
    proj_b = torch.randn(d_out, r, generator=g, dtype=F64)
    return sv.sorf_matrix(d_out, 42, dtype=F64), proj_b, torch.randn(r, d_in, generator=g, dtype=F64)


def _target(clients, p, s, proj_b, proj_a):
    return sum(w * sv.sorf_delta(s, c.b_real, c.b_imag, proj_b, c.scale, c.angles, proj_a) for w, c in zip(p, clients))


@pytest.mark.parametrize("train_b", [False, True])
def test_fold_is_exact_for_unequal_sample_counts(train_b):
    s, proj_b, proj_a = _pieces(10, 7, 4)
    clients = _clients(3, 10, 4, train_b)
    p = torch.tensor(SAMPLES, dtype=F64) / sum(SAMPLES)
    agg = sv.aggregate_sorf_vera(clients, p, s, proj_b, proj_a, "fold")
    q = agg.params
    represented = sv.sorf_delta(s, q.b_real, q.b_imag, proj_b, q.scale, q.angles, proj_a)
    target = _target(clients, p, s, proj_b, proj_a)
    torch.testing.assert_close(represented + agg.residual, target, rtol=1e-12, atol=1e-12)
    assert 0.01 < agg.refit_error < 0.5  # the mean of scaled rotations is not one: the rest is folded
    torch.testing.assert_close(q.b_real, sum(w * c.b_real for w, c in zip(p, clients)))


def test_reference_refit_is_lossy_even_for_one_client_and_fold_is_not():
    s, proj_b, proj_a = _pieces(16, 12, 4)
    one = _clients(1, 16, 4, train_b=False)
    p = torch.ones(1, dtype=F64)
    ref = sv.aggregate_sorf_vera(one, p, s, proj_b, proj_a, "reference")
    ours = sv.aggregate_sorf_vera(one, p, s, proj_b, proj_a, "fold")
    assert ref.refit_error > 0.5 and ref.residual is None
    assert ours.refit_error < 1e-12 and float(ours.residual.abs().max()) < 1e-12
    q = ref.params
    refit = sv.sorf_delta(s, q.b_real, q.b_imag, proj_b, q.scale, q.angles, proj_a)
    target = _target(one, p, s, proj_b, proj_a)
    assert float((refit - target).norm() / target.norm()) == pytest.approx(ref.refit_error)


# -- the rule on SORF-VeRA layers -------------------------------------------------------------------


class Net(nn.Module):
    """A non-square nn.Linear (6 -> 10), a GPT-2 Conv1D (10 -> 4) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.c1d, self.head = nn.Linear(6, 10), Conv1D(4, 10), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c1d(torch.relu(self.lin(x))))


class Ctx:
    def __init__(self, model: nn.Module) -> None:
        self.template = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.layers = sorf_vera_layers(model)
        self.trainable = {k for k, p in model.named_parameters() if p.requires_grad}

    def adapted_layers(self):
        return self.layers

    def trainable_keys(self):
        return set(self.trainable)

    def client_template(self):
        return self.template


def _model(train_b: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return apply_sorf_vera(
        Net(), SORFVeRAConfig(r=3, target_modules=["lin", "c1d"], train_b=train_b, modules_to_save=["head"])
    )


def _train(state, algo, seed: int, samples=SAMPLES) -> list[ClientResult]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for cid, n in enumerate(samples):
        plan = algo.configure_client(state, cid, None)
        w = {k: plan.weights[k] + 0.3 * torch.randn(plan.weights[k].shape, generator=g) for k in plan.upload_keys}
        out.append(ClientResult(client_id=cid, num_samples=n, weights=w))
    return out


def _merged(model: nn.Module, weights: dict) -> dict[str, torch.Tensor]:
    """Each layer's merged weight (the layer's own get_delta_weight), in the base layout."""
    model.load_state_dict(weights, strict=False)
    out = {}
    for layer in sorf_vera_layers(model):
        module = model.get_submodule(layer.name)
        out[layer.name] = (module.get_base_weight() + module.get_delta_weight("default")).detach().clone()
    return out


@pytest.mark.parametrize("train_b", [False, True])
def test_rule_effective_weights_equal_weighted_mean_of_clients_over_two_rounds(train_b):
    model = _model(train_b)
    ctx = Ctx(model)
    algo = get_rule("sorf_vera")()
    state = algo.init_server(ctx.template, ctx)
    p = [n / sum(SAMPLES) for n in SAMPLES]
    for rnd in range(2):
        results = _train(state, algo, seed=rnd)
        want = {}
        for w, r in zip(p, results):
            for name, t in _merged(model, {**ctx.template, **state["global"], **r.weights}).items():
                want[name] = want.get(name, 0) + w * t
        state = algo.aggregate(state, results, ctx)
        got = _merged(model, {**ctx.template, **state["global"]})
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    assert 0 < algo.round_metrics(state)["sorf_vera/refit_error"] < 1


def test_frozen_projections_and_b_are_not_uploaded_and_b_does_not_travel():
    model = _model()
    ctx = Ctx(model)
    algo = sv.SORFVeRA()
    state = algo.init_server(ctx.template, ctx)
    plan = algo.configure_client(state, 0, None)
    assert plan.upload_keys == {
        "lin.sorf_d_scale.default", "lin.sorf_d_angles.default", "c1d.sorf_d_scale.default",
        "c1d.sorf_d_angles.default", "head.weight", "head.bias",
    }
    assert not any(k.split(".")[1] in ("sorf_A", "sorf_B", "sorf_S") for k in plan.weights)
    assert plan.wire_bytes == num_bytes({k: state["global"][k] for k in plan.upload_keys})
    state = algo.aggregate(state, _train(state, algo, seed=0), ctx)
    # each layer's correction is S Gamma(b) B_s dLambda A_s: the r x r dLambda (9 floats) per layer
    assert algo.configure_client(state, 5, None).wire_bytes == plan.wire_bytes + 2 * 9 * 4


def test_reference_refit_moves_b_on_the_server_and_loses_the_update():
    model = _model()
    ctx = Ctx(model)
    algo = sv.SORFVeRA(refit="reference")
    state = algo.init_server(ctx.template, ctx)
    new = algo.aggregate(state, _train(state, algo, seed=0), ctx)
    assert not torch.equal(new["global"]["lin.sorf_b_real.default"], state["global"]["lin.sorf_b_real.default"])
    for layer in ctx.layers:
        assert torch.equal(new["global"][layer.base_key], state["global"][layer.base_key])
    assert algo.round_metrics(new)["sorf_vera/refit_error"] > 0.5
    plan = algo.configure_client(new, 0, None)
    assert plan.wire_bytes == num_bytes({k: new["global"][k] for k in plan.upload_keys}) + 4 * (5 + 5 + 2 + 2)


def test_bad_input_is_a_one_line_error():
    model = _model()
    ctx = Ctx(model)
    algo = sv.SORFVeRA()
    state = algo.init_server(ctx.template, ctx)
    results = _train(state, algo, seed=0)
    results[0].weights.pop("c1d.sorf_d_angles.default")
    with pytest.raises(FedMoEError) as err:
        algo.aggregate(state, results, ctx)
    assert "client 0" in str(err.value) and "c1d.sorf_d_angles.default" in str(err.value) and "\n" not in str(err.value)
    results = _train(state, algo, seed=0)
    results[2].weights["lin.sorf_d_angles.default"] = torch.zeros(6)
    with pytest.raises(FedMoEError, match=r"shape \[6\].*\[3\]"):
        algo.aggregate(state, results, ctx)
    with pytest.raises(FedMoEError, match="refit"):
        sv.SORFVeRA(refit="svd")
    plain = Ctx(Net())
    with pytest.raises(FedMoEError, match="no SORF-VeRA layers"):
        sv.SORFVeRA().init_server(plain.template, plain)
