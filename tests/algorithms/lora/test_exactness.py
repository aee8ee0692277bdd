"""Exact rules: the aggregate's effective weights (W + s B A, base layout) equal sum_i p_i of the
clients' effective weights, and its layer outputs the p-weighted mean of the clients' outputs,
on a non-square nn.Linear and a Conv1D (fan_in_fan_out), with and without rsLoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedmoe.algorithms.lora import fedex_aggregate, fedit_aggregate, ffa_aggregate, flora_aggregate
from fedmoe.algorithms.lora.layout import to_base_layout

SAMPLES = [3, 10, 1]  # unequal n_i
TOL = dict(rtol=1e-10, atol=1e-10)


def _p(samples):
    return [n / sum(samples) for n in samples]


def _expected(kit, global_state, clients, layer, samples, scalings=None):
    p = _p(samples)
    out = torch.zeros_like(global_state[layer.base_key])
    for i, (c, w) in enumerate(zip(clients, p)):
        s = None if scalings is None else scalings[i]
        out += w * kit.effective({**c, layer.base_key: global_state[layer.base_key]}, layer, scaling=s)
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_fedex_effective_weights_and_outputs_equal_weighted_mean_of_clients(kit, rslora):
    layers = kit.make_layers(rslora=rslora)
    g = kit.make_global(layers)
    clients = kit.make_clients(g, layers)
    new, info = fedex_aggregate(g, clients, SAMPLES, layers)
    x = torch.randn(4, 7, dtype=torch.float64)
    for layer in layers:
        want = _expected(kit, g, clients, layer, SAMPLES)
        torch.testing.assert_close(kit.effective(new, layer), want, **TOL)
        d_in = kit.DIMS[layer.name][1]
        xi = x[:, :d_in]
        outs = [kit.layer_output(kit.effective({**c, layer.base_key: g[layer.base_key]}, layer), layer, xi) for c in clients]
        mean_out = sum(w * o for w, o in zip(_p(SAMPLES), outs))
        torch.testing.assert_close(kit.layer_output(kit.effective(new, layer), layer, xi), mean_out, **TOL)
        assert info["rank"][layer.name] == (len(clients) - 1) * 3
    assert new[kit.HEAD[0]].shape == g[kit.HEAD[0]].shape


def test_fedex_leaves_the_input_state_unchanged_unless_inplace(kit):
    layers = kit.make_layers()
    g = kit.make_global(layers)
    before = {k: v.clone() for k, v in g.items()}
    clients = kit.make_clients(g, layers)
    new, _ = fedex_aggregate(g, clients, SAMPLES, layers)
    for k in g:
        assert torch.equal(g[k], before[k])
    again, _ = fedex_aggregate(g, clients, SAMPLES, layers, inplace=True)
    for layer in layers:
        assert again[layer.base_key] is g[layer.base_key]
        torch.testing.assert_close(again[layer.base_key], new[layer.base_key], **TOL)


def test_fedit_gap_is_weighted_covariance_of_factors(kit):
    layers = kit.make_layers()
    g = kit.make_global(layers)
    clients = kit.make_clients(g, layers)
    new, _ = fedit_aggregate(g, clients, SAMPLES, layers)
    p = _p(SAMPLES)
    for layer in layers:
        a_bar = sum(w * c[layer.a_key] for w, c in zip(p, clients))
        b_bar = sum(w * c[layer.b_key] for w, c in zip(p, clients))
        torch.testing.assert_close(new[layer.a_key], a_bar, **TOL)
        torch.testing.assert_close(new[layer.b_key], b_bar, **TOL)
        gap = sum(w * (c[layer.b_key] - b_bar) @ (c[layer.a_key] - a_bar) for w, c in zip(p, clients))
        missing = _expected(kit, g, clients, layer, SAMPLES) - kit.effective(new, layer)
        torch.testing.assert_close(missing, to_base_layout(layer.scaling * gap, layer.fan_in_fan_out), **TOL)
        assert gap.abs().max() > 1e-3  # the gap is real: FedIT alone is not exact


def test_always_transposing_the_residual_is_wrong_for_linear_and_ours_is_right(kit):
    """The reference code adds R^T: a shape error for a non-square Linear, a wrong value for a square
    one (and right only for Conv1D); folding through to_base_layout is exact in all three."""
    layers = kit.make_layers()
    lin, c1d = layers
    g = kit.make_global(layers)
    clients = kit.make_clients(g, layers)
    p = _p(SAMPLES)

    def residual(layer, gs, cs):
        a_bar = sum(w * c[layer.a_key] for w, c in zip(p, cs))
        b_bar = sum(w * c[layer.b_key] for w, c in zip(p, cs))
        return layer.scaling * (sum(w * c[layer.b_key] @ c[layer.a_key] for w, c in zip(p, cs)) - b_bar @ a_bar)

    with pytest.raises(RuntimeError):
        g[lin.base_key] + residual(lin, g, clients).T  # 5 x 7 base, 7 x 5 transposed residual
    new, _ = fedex_aggregate(g, clients, SAMPLES, layers)
    torch.testing.assert_close(kit.effective(new, lin), _expected(kit, g, clients, lin, SAMPLES), **TOL)
    # Conv1D: the transpose is the right layout, and ours agrees with it
    ref = g[c1d.base_key] + residual(c1d, g, clients).T
    torch.testing.assert_close(new[c1d.base_key], ref, **TOL)

    # a square Linear (d_out = d_in = 6): transposing silently gives wrong weights
    sq = type(lin)("sq", "sq.base_layer.weight", "sq.lora_A.default.weight", "sq.lora_B.default.weight", lin.scaling)
    gen = torch.Generator().manual_seed(5)
    gs = {sq.base_key: torch.randn(6, 6, generator=gen, dtype=torch.float64),
          sq.a_key: torch.randn(3, 6, generator=gen, dtype=torch.float64),
          sq.b_key: torch.randn(6, 3, generator=gen, dtype=torch.float64)}
    cs = [{sq.a_key: gs[sq.a_key] + torch.randn(3, 6, generator=gen, dtype=torch.float64),
           sq.b_key: gs[sq.b_key] + torch.randn(6, 3, generator=gen, dtype=torch.float64)} for _ in p]
    want = _expected(kit, gs, cs, sq, SAMPLES)
    wrong = gs[sq.base_key] + residual(sq, gs, cs).T
    new_sq, _ = fedex_aggregate(gs, cs, SAMPLES, [sq])
    got = kit.effective(new_sq, sq)
    torch.testing.assert_close(got, want, **TOL)
    wrong_eff = kit.effective({**new_sq, sq.base_key: wrong}, sq)
    assert (wrong_eff - want).abs().max() > 1e-2


@pytest.mark.parametrize("rslora", [False, True])
def test_ffa_is_exact_with_a_shared_frozen_a(kit, rslora):
    layers = kit.make_layers(rslora=rslora)
    g = kit.make_global(layers)
    clients = kit.make_clients(g, layers, train_a=False)
    uploads = [{k: v for k, v in c.items() if "lora_A" not in k} for c in clients]
    new, _ = ffa_aggregate(g, uploads, SAMPLES, layers)
    x = torch.randn(4, 7, dtype=torch.float64)
    for layer in layers:
        assert torch.equal(new[layer.a_key], g[layer.a_key])
        assert torch.equal(new[layer.base_key], g[layer.base_key])
        torch.testing.assert_close(kit.effective(new, layer), _expected(kit, g, clients, layer, SAMPLES), **TOL)
        xi = x[:, : kit.DIMS[layer.name][1]]
        outs = [kit.layer_output(kit.effective({**c, layer.base_key: g[layer.base_key]}, layer), layer, xi) for c in clients]
        torch.testing.assert_close(
            kit.layer_output(kit.effective(new, layer), layer, xi), sum(w * o for w, o in zip(_p(SAMPLES), outs)), **TOL
        )


@pytest.mark.parametrize("rslora", [False, True])
def test_flora_with_mixed_ranks_is_exact_and_resets_b(kit, rslora):
    ranks = [3, 1, 2]
    layers = kit.make_layers(rslora=rslora)
    g = kit.make_global(layers)
    clients = kit.make_clients(g, layers, ranks=ranks)
    # a client whose network really has rank r_i has its own scaling (alpha / r_i, or / sqrt(r_i))
    scal = [{layer.name: 6.0 / (r ** 0.5 if rslora else r) for layer in layers} for r in ranks]
    new, info = flora_aggregate(g, clients, SAMPLES, layers, scalings=scal)
    x = torch.randn(4, 7, dtype=torch.float64)
    for layer in layers:
        per_client = [s[layer.name] for s in scal]
        want = _expected(kit, g, clients, layer, SAMPLES, scalings=per_client)
        torch.testing.assert_close(kit.effective(new, layer), want, **TOL)
        assert not new[layer.b_key].any()
        assert info["rank"][layer.name] == sum(ranks)
        xi = x[:, : kit.DIMS[layer.name][1]]
        outs = [
            kit.layer_output(kit.effective({**c, layer.base_key: g[layer.base_key]}, layer, scaling=s), layer, xi)
            for c, s in zip(clients, per_client)
        ]
        torch.testing.assert_close(
            kit.layer_output(new[layer.base_key], layer, xi), sum(w * o for w, o in zip(_p(SAMPLES), outs)), **TOL
        )


def test_flora_zero_padded_ranks_equal_cut_ranks(kit):
    layers = kit.make_layers()
    g = kit.make_global(layers)
    cut = kit.make_clients(g, layers, ranks=[3, 1, 2])
    padded = []
    for c in cut:
        p = dict(c)
        for layer in layers:
            a, b = torch.zeros_like(g[layer.a_key]), torch.zeros_like(g[layer.b_key])
            r = c[layer.a_key].shape[0]
            a[:r], b[:, :r] = c[layer.a_key], c[layer.b_key]
            p[layer.a_key], p[layer.b_key] = a, b
        padded.append(p)
    one, _ = flora_aggregate(g, cut, SAMPLES, layers)
    two, _ = flora_aggregate(g, padded, SAMPLES, layers)
    for layer in layers:
        torch.testing.assert_close(one[layer.base_key], two[layer.base_key], **TOL)


def _peft_clients(model, layers, m, seed):
    gen = torch.Generator().manual_seed(seed)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for _ in range(m):
        st = {}
        for layer in layers:
            for key in (layer.a_key, layer.b_key):
                st[key] = base[key] + 0.3 * torch.randn(base[key].shape, generator=gen, dtype=base[key].dtype)
        out.append(st)
    return base, out


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("rule", ["fedex", "flora"])
def test_real_peft_linear_and_conv1d_layers_aggregate_exactly(kit, rule, rslora):
    """PEFT-wrapped non-square nn.Linear and GPT-2 Conv1D layers: each adapted layer's output under
    the aggregate equals the p-weighted mean of its outputs under the clients' adapters."""
    torch.manual_seed(0)
    for target, fan_in_fan_out in ((nn.Linear(7, 5), False), (Conv1D(5, 7), True)):  # Conv1D(nf=d_out, nx=d_in)
        net = nn.Sequential(target).double()
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], fan_in_fan_out=fan_in_fan_out, use_rslora=rslora,
                         init_lora_weights=True)
        model = get_peft_model(net, cfg)
        layers = kit.peft_layers(model)
        assert len(layers) == 1 and layers[0].fan_in_fan_out == fan_in_fan_out
        assert layers[0].scaling == pytest.approx(8 / 2 if rslora else 2.0)
        base, clients = _peft_clients(model, layers, 3, seed=3)
        g = {k: base[k] for layer in layers for k in (layer.base_key, layer.a_key, layer.b_key)}
        fn = fedex_aggregate if rule == "fedex" else flora_aggregate
        new, _ = fn(g, clients, SAMPLES, layers)
        x = torch.randn(6, 7, dtype=torch.float64)
        outs = []
        for c in clients:
            model.load_state_dict({**base, **c})
            outs.append(model(x).detach())
        model.load_state_dict({**base, **new})
        torch.testing.assert_close(model(x).detach(), sum(w * o for w, o in zip(_p(SAMPLES), outs)), **TOL)
