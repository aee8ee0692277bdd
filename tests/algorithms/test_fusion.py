"""Weighted combinations of state dicts: fusion.weighted_average, mix, num_bytes, all_finite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmoe.algorithms.fusion import all_finite, is_mixable, mix, num_bytes, weighted_average


def tiny_state(w: list[float], b: float, steps: int, mask: list[bool]) -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor(w),
        "b": torch.tensor([b]),
        "num_batches_tracked": torch.tensor(steps, dtype=torch.int64),
        "mask": torch.tensor(mask),
    }


def clone(state):
    return {k: v.clone() for k, v in state.items()}


def test_weighted_average_of_two_clients_with_weights_1_and_3_is_quarter_three_quarters():
    a = tiny_state([1.0, 2.0], 4.0, steps=5, mask=[True, False])
    b = tiny_state([5.0, -2.0], 8.0, steps=9, mask=[False, False])
    out = weighted_average([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([0.25 * 1 + 0.75 * 5, 0.25 * 2 + 0.75 * -2]))
    torch.testing.assert_close(out["b"], torch.tensor([0.25 * 4 + 0.75 * 8]))


def test_sample_weighted_mean_of_three_clients_equals_hand_value():
    torch.manual_seed(0)
    states = [{"w": torch.randn(3, 2), "b": torch.randn(2)} for _ in range(3)]
    sizes = [10, 30, 60]
    out = weighted_average(states, sizes)
    for key in ("w", "b"):
        hand = (10 * states[0][key] + 30 * states[1][key] + 60 * states[2][key]) / 100
        torch.testing.assert_close(out[key], hand)
    assert list(out) == ["w", "b"]


def test_weighted_average_is_invariant_to_scaling_the_weights():
    torch.manual_seed(1)
    states = [{"w": torch.randn(4)} for _ in range(2)]
    torch.testing.assert_close(
        weighted_average(states, [2, 6])["w"], weighted_average(states, [0.25, 0.75])["w"]
    )


def test_integer_and_bool_buffers_keep_the_base_value_and_dtype():
    base = tiny_state([0.0, 0.0], 0.0, steps=3, mask=[True, True])
    a = tiny_state([1.0, 2.0], 4.0, steps=100, mask=[False, False])
    b = tiny_state([5.0, -2.0], 8.0, steps=200, mask=[False, True])
    out = weighted_average([a, b], [1, 1], base=base)
    assert out["num_batches_tracked"].dtype == torch.int64
    assert out["num_batches_tracked"].item() == 3
    assert out["mask"].dtype == torch.bool
    assert out["mask"].tolist() == [True, True]
    # the floats are the mean of the clients, not touched by the base
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 0.0]))


def test_integer_buffers_come_from_the_first_state_without_a_base():
    a = tiny_state([1.0, 2.0], 4.0, steps=7, mask=[True, False])
    b = tiny_state([5.0, -2.0], 8.0, steps=8, mask=[False, True])
    out = weighted_average([a, b], [1, 3])
    assert out["num_batches_tracked"].item() == 7 and out["num_batches_tracked"].dtype == torch.int64
    assert out["mask"].tolist() == [True, False]


def test_batchnorm2d_state_dict_averages_floats_and_keeps_num_batches_tracked():
    torch.manual_seed(0)
    bns = [nn.BatchNorm2d(4) for _ in range(3)]
    for i, bn in enumerate(bns):
        bn.train()
        for _ in range(i + 1):  # 1, 2, 3 batches: different running stats and step counts
            bn(torch.randn(5, 4, 3, 3) * (i + 1) + i)
        with torch.no_grad():
            bn.weight.normal_()
            bn.bias.normal_()
    base, *clients = [bn.state_dict() for bn in bns]
    assert [s["num_batches_tracked"].item() for s in (base, *clients)] == [1, 2, 3]
    out = weighted_average(clients, [1, 3], base=base)
    for key in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(out[key], 0.25 * clients[0][key] + 0.75 * clients[1][key])
        assert out[key].dtype == torch.float32
    assert out["num_batches_tracked"].dtype == torch.int64
    assert out["num_batches_tracked"].item() == 1
    # and it loads back into a BatchNorm2d
    nn.BatchNorm2d(4).load_state_dict(out)


def test_mix_with_base_weight_adds_the_base_and_ignores_integers():
    base = tiny_state([2.0, 4.0], 1.0, steps=11, mask=[False, True])
    a = tiny_state([1.0, 2.0], 4.0, steps=100, mask=[True, False])
    b = tiny_state([5.0, -2.0], 8.0, steps=200, mask=[True, True])
    out = mix(base, [a, b], [0.2, 0.3], base_weight=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([0.5 * 2 + 0.2 * 1 + 0.3 * 5, 0.5 * 4 + 0.2 * 2 + 0.3 * -2]))
    torch.testing.assert_close(out["b"], torch.tensor([0.5 * 1 + 0.2 * 4 + 0.3 * 8]))
    assert out["num_batches_tracked"].item() == 11 and out["num_batches_tracked"].dtype == torch.int64
    assert out["mask"].tolist() == [False, True] and out["mask"].dtype == torch.bool
    assert list(out) == list(base)


def test_mix_with_zero_client_weights_returns_the_base_scaled():
    base = {"w": torch.tensor([2.0, -6.0])}
    out = mix(base, [{"w": torch.tensor([100.0, 100.0])}], [0.0], base_weight=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, -3.0]))


def test_mix_and_average_do_not_modify_their_inputs():
    torch.manual_seed(0)
    base = {"w": torch.randn(3), "n": torch.tensor(2)}
    states = [{"w": torch.randn(3), "n": torch.tensor(5)} for _ in range(2)]
    before = [clone(s) for s in (base, *states)]
    out1 = mix(base, states, [0.5, 0.25], base_weight=0.25)
    out2 = weighted_average(states, [1, 2], base=base)
    for orig, now in zip(before, (base, *states)):
        for k in orig:
            assert torch.equal(orig[k], now[k])
    # the outputs are new tensors, so writing into them leaves the inputs alone
    out1["w"].add_(1.0)
    out1["n"].add_(1)
    out2["n"].add_(1)
    assert torch.equal(base["w"], before[0]["w"]) and base["n"].item() == 2


def test_half_precision_states_accumulate_in_float32_and_keep_their_dtype():
    # 2048 + 1 is not representable in fp16: summing in fp16 would lose the 1 before dividing
    a = {"w": torch.tensor([2048.0], dtype=torch.float16)}
    b = {"w": torch.tensor([1.0], dtype=torch.float16)}
    c = {"w": torch.tensor([-2048.0], dtype=torch.float16)}
    out = weighted_average([a, b, c], [1, 1, 1])
    assert out["w"].dtype == torch.float16
    torch.testing.assert_close(out["w"], torch.tensor([1.0 / 3], dtype=torch.float16))


def test_mismatched_keys_raise():
    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    b = {"w": torch.zeros(2), "c": torch.zeros(1)}
    with pytest.raises(KeyError):
        weighted_average([a, b], [1, 1])
    with pytest.raises(KeyError):
        mix(a, [b], [1.0], base_weight=0.0)
    with pytest.raises(KeyError):
        weighted_average([a], [1], base={"w": torch.zeros(2)})


def test_bad_weights_raise():
    a = {"w": torch.zeros(2)}
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([a, a], [0, 0])
    with pytest.raises(ValueError):
        mix(a, [a, a], [1.0], base_weight=0.0)


def test_num_bytes_is_elements_times_element_size():
    lin = nn.Linear(3, 2)  # 6 + 2 elements
    state = lin.state_dict()
    assert num_bytes(state) == 8 * 4
    assert num_bytes({k: v.half() for k, v in state.items()}) == 8 * 2
    assert num_bytes({k: v.double() for k, v in state.items()}) == 8 * 8
    # BatchNorm2d(4): 4 x (weight, bias, mean, var) in fp32 plus one int64 counter
    assert num_bytes(nn.BatchNorm2d(4).state_dict()) == 16 * 4 + 8
    assert num_bytes({"mask": torch.ones(10, dtype=torch.bool)}) == 10


def test_all_finite_detects_nan_and_inf_in_floats_only():
    good = {"w": torch.randn(3), "n": torch.tensor(3)}
    assert all_finite(good)
    assert not all_finite({**good, "w": torch.tensor([1.0, float("nan")])})
    assert not all_finite({**good, "w": torch.tensor([float("-inf"), 0.0])})
    assert not all_finite({**good, "h": torch.tensor([float("inf")], dtype=torch.float16)})
    # integer tensors cannot be non-finite and are ignored (huge values included)
    assert all_finite({**good, "n": torch.tensor(torch.iinfo(torch.int64).max)})
    assert all_finite({"mask": torch.tensor([True, False])})


def test_is_mixable_only_for_floating_and_complex():
    assert is_mixable(torch.zeros(1)) and is_mixable(torch.zeros(1, dtype=torch.float16))
    assert is_mixable(torch.zeros(1, dtype=torch.complex64))
    assert not is_mixable(torch.zeros(1, dtype=torch.int64))
    assert not is_mixable(torch.zeros(1, dtype=torch.bool))


def test_all_finite_is_not_fooled_by_an_overflowing_sum_of_finite_values():
    big = torch.full((4,), 3.0e38)  # finite float32 values whose float32 sum overflows
    assert not bool(torch.isfinite(big.sum()))
    assert all_finite({"w": big, "h": torch.full((8,), 6.0e4, dtype=torch.float16)})
    assert not all_finite({"w": torch.cat([big, torch.tensor([float("inf")])])})
