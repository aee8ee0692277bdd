"""Staleness functions, FedAsync / FedBuff over state dicts, their exact LoRA versions, SVD compression."""

from __future__ import annotations

import pytest
import torch

from fedmoe.algorithms.asynchronous import (
    Staleness,
    compress_factors,
    fedasync_lora,
    fedasync_mix,
    fedbuff_apply,
    fedbuff_lora,
    hinge,
    mixing_weight,
    polynomial,
)
from fedmoe.algorithms.lora.layout import LoRALayer
from fedmoe.errors import ConfigError

LAYERS = [LoRALayer("q", "q.base", "q.lora_A", "q.lora_B", 2.0), LoRALayer("v", "v.base", "v.lora_A", "v.lora_B", 0.5)]


def adapter(seed: int, r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in LAYERS:
        out[layer.a_key] = torch.randn(r, 8, generator=g, dtype=torch.float64)
        out[layer.b_key] = torch.randn(16, r, generator=g, dtype=torch.float64)
    out["head"] = torch.randn(3, generator=g, dtype=torch.float64)
    return out


def assert_close(a, b, rtol=1e-7, atol=1e-9):
    """torch.allclose with the gap in the message (torch.testing's first call costs a second of imports)."""
    assert torch.allclose(a, b, rtol=rtol, atol=atol), (a - b).abs().max().item()


def delta(state, layer):
    return layer.scaling * state[layer.b_key] @ state[layer.a_key]


def test_staleness_functions_match_hand_computed_values():
    assert Staleness("constant")(7) == 1.0
    assert polynomial(3, 0.5) == pytest.approx(0.5)  # (3 + 1)^(-1/2)
    assert Staleness("polynomial", a=1.0)(4) == pytest.approx(0.2)
    assert hinge(4, b=4, h=1.0) == 1.0
    assert hinge(6, b=4, h=0.5) == pytest.approx(0.5)  # 1 / (0.5 * 2 + 1)
    ref = Staleness.preset("reference")
    assert [ref(d) for d in (0, 1, 10)] == pytest.approx([1.0, 1 / 1.1, 0.5])
    assert mixing_weight(0.6, Staleness("polynomial", a=0.5), 3) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"kind": "cubic"}, "kind"), ({"a": -1.0}, "exponent"), ({"kind": "hinge", "b": -2}, "threshold"),
     ({"kind": "hinge", "h": 0.0}, "slope")],
)
def test_bad_staleness_settings_raise_config_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        Staleness(**kwargs)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="reference"):
        Staleness.preset("seed")


def test_fedasync_mix_keeps_integer_tensors_and_mixes_floats():
    cur = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    new = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}
    out = fedasync_mix(cur, new, 0.25)
    assert torch.allclose(out["w"], torch.tensor([1.5, 3.0]))
    assert out["n"].item() == 5


def test_fedbuff_apply_averages_weighted_deltas_with_server_lr():
    cur = {"w": torch.tensor([1.0])}
    out = fedbuff_apply(cur, [{"w": torch.tensor([2.0])}, {"w": torch.tensor([4.0])}], [1.0, 0.5], server_lr=0.5)
    assert out["w"].item() == pytest.approx(1.0 + 0.5 / 2 * (2.0 + 0.5 * 4.0))


def test_factor_mixing_alone_is_inexact_and_the_residual_makes_it_exact():
    cur, new, w = adapter(0), adapter(1), 0.3
    out, factors = fedasync_lora(cur, new, w, LAYERS)
    for layer in LAYERS:
        target = (1 - w) * delta(cur, layer) + w * delta(new, layer)
        assert not torch.allclose(delta(out, layer), target, atol=1e-6)
        u, v = factors[layer.name]
        assert u.shape[1] == 4  # rank <= r
        assert_close(delta(out, layer) + u @ v, target, rtol=1e-12, atol=1e-12)
    assert_close(out["head"], 0.7 * cur["head"] + 0.3 * new["head"])


def test_fedbuff_lora_is_exact_on_the_effective_weights():
    cur = adapter(0)
    pairs = [(adapter(1), adapter(2)), (adapter(3), cur)]
    weights, eta = [1.0, 0.4], 0.8
    out, factors = fedbuff_lora(cur, pairs, weights, LAYERS, server_lr=eta)
    for layer in LAYERS:
        target = delta(cur, layer) + eta / 2 * sum(
            wi * (delta(x, layer) - delta(b, layer)) for (x, b), wi in zip(pairs, weights)
        )
        u, v = factors[layer.name]
        assert_close(delta(out, layer) + u @ v, target, rtol=1e-12, atol=1e-12)
    expected_head = cur["head"] + eta / 2 * sum(wi * (x["head"] - b["head"]) for (x, b), wi in zip(pairs, weights))
    assert_close(out["head"], expected_head)


def test_compression_keeps_the_budget_and_reports_the_dropped_energy_exactly():
    q1, _ = torch.linalg.qr(torch.randn(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    sig = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    # factors with 7 columns (redundant) whose product has singular values 5, 4, 3, 2, 1
    u = torch.cat([q1 * sig, torch.zeros(16, 2, dtype=torch.float64)], dim=1)
    v = torch.cat([q2.T, torch.randn(2, 8, dtype=torch.float64)], dim=0)
    u2, v2, info = compress_factors(u, v, 3)
    assert u2.shape == (16, 3) and v2.shape == (3, 8)
    assert info.energy == pytest.approx(55.0) and info.dropped == pytest.approx(4.0 + 1.0)
    assert torch.linalg.matrix_norm(u @ v - u2 @ v2).item() ** 2 == pytest.approx(5.0)


def test_compression_within_budget_changes_nothing():
    u, v = torch.randn(16, 3), torch.randn(3, 8)
    u2, v2, info = compress_factors(u, v, 3)
    assert u2 is u and v2 is v and info.dropped == 0.0
