"""Plans and results survive Flower's records exactly: every dtype bit for bit (bfloat16 too), the
keys to upload and keep, options, and regularisers whose tensors refer to the plan's weights; a
plan cannot smuggle in anything but fedmoe classes and plain containers."""

import pickle

import pytest
import torch

from fedmoe.algorithms.base import ClientPlan, ClientResult
from fedmoe.algorithms.fedprox import ProximalTerm
from fedmoe.flower.records import (
    content_to_plan, content_to_result, dump_object, load_object, plan_to_content, record_to_state,
    result_to_content, state_to_record,
)


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g),
        "h": torch.randn(5, generator=g).to(torch.float16),
        "b": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_state_dicts_round_trip_bit_for_bit_in_every_dtype():
    w = weights()
    back = record_to_state(state_to_record(w))
    assert same(w, back)
    back["w"] += 1  # writable, and not a view of the record's bytes
    assert not torch.equal(back["w"], w["w"])


def test_a_plan_round_trips_with_its_keys_options_and_proximal_term_anchored_to_the_weights_sent():
    w = weights()
    term = ProximalTerm(w, mu=0.25)
    plan = ClientPlan(weights=w, regularizer=term, options={"rank": 4, "names": ("a", "b")},
                      upload_keys=frozenset({"w"}), keep_keys=frozenset({"h"}))
    content = plan_to_content(plan, client_id=3, server_round=5, seed=11, keep_optimizer=True)
    assert "regularizer-tensors" not in content  # the anchor is the weights sent, not a second copy
    back, task = content_to_plan(content)
    assert (task["client-id"], task["round"], task["seed"], task["keep-optimizer"]) == (3, 5, 11, True)
    assert same(back.weights, w)
    assert back.upload_keys == {"w"} and back.keep_keys == {"h"}
    assert back.options == {"rank": 4, "names": ("a", "b")}
    assert isinstance(back.regularizer, ProximalTerm) and back.regularizer.mu == 0.25
    assert all(back.regularizer.anchor[k] is back.weights[k] for k in w)


def test_a_regulariser_with_tensors_of_its_own_carries_them_beside_the_weights():
    w = weights()
    other = {"w": torch.ones(3, 4)}
    content = plan_to_content(ClientPlan(weights=w, regularizer=ProximalTerm(other, 1.0)), 0, 1, 0)
    back, _ = content_to_plan(content)
    assert torch.equal(back.regularizer.anchor["w"], torch.ones(3, 4))


def test_upload_keys_none_means_all_and_an_empty_set_means_none():
    w = weights()
    assert content_to_plan(plan_to_content(ClientPlan(weights=w), 0, 1, 0))[0].upload_keys is None
    plan = ClientPlan(weights=w, upload_keys=frozenset())
    assert content_to_plan(plan_to_content(plan, 0, 1, 0))[0].upload_keys == frozenset()


def test_a_result_round_trips_with_its_kept_weights_and_metrics():
    result = ClientResult(client_id=4, num_samples=123, weights=weights(), metrics={"loss": 0.5, "steps": 3},
                          base_version=2, kept={"h": torch.zeros(2)})
    back = content_to_result(result_to_content(result))
    assert (back.client_id, back.num_samples, back.base_version) == (4, 123, 2)
    assert same(back.weights, result.weights) and same(back.kept, result.kept)
    assert back.metrics == {"loss": 0.5, "steps": 3.0}


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo owned",))


def test_a_plan_object_outside_fedmoe_is_refused_when_loaded():
    data, extra = dump_object({"regularizer": Evil(), "options": {}}, {})
    with pytest.raises(pickle.UnpicklingError, match="may not carry posix.system"):
        load_object(data, {}, extra)


def test_hetlora_tail_penalty_travels_with_its_layers():
    from fedmoe.algorithms.lora.hetlora import TailPenalty
    from fedmoe.algorithms.lora.layout import LoRALayer

    layers = [LoRALayer("q", "q.base_layer.weight", "q.lora_A.default.weight", "q.lora_B.default.weight", 2.0, False)]
    plan = ClientPlan(weights=weights(), regularizer=TailPenalty(layers, rank=4, gamma=0.5, lam=0.1))
    back, _ = content_to_plan(plan_to_content(plan, 0, 1, 0))
    reg = back.regularizer
    assert isinstance(reg, TailPenalty) and reg.layers == layers and (reg.rank, reg.gamma, reg.lam) == (4, 0.5, 0.1)
