"""PEFT adapter helpers: spec parsing, target checks, and the layout records the rules read."""

from __future__ import annotations

import math

import peft  # noqa: F401  (imported at collection: its 5-8 s import is not a test's time)
import pytest
import torch
import torch.nn.functional as F

from fedmoe.algorithms.lora.layout import LoRALayer, SORFVeRALayer, VeRALayer, to_base_layout
from fedmoe.errors import FedMoEError
from fedmoe.models.lora import AdapterSpec, adapted_layers, default_target_modules, delta_weight
from fedmoe.models.text import HFSequenceClassifier, tiny_config


def _net(model_type: str, **adapter) -> HFSequenceClassifier:
    return HFSequenceClassifier(3, config=tiny_config(model_type), adapter={"init_seed": 0, **adapter})


def _randomise_adapters(net: torch.nn.Module) -> None:
    """Non-zero B (PEFT starts it at 0) so that merged weights differ from the base."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if any(k in name for k in ("lora_B", "vera_lambda_b", "sorf_d_angles", "sorf_b_imag")):
                p.copy_(torch.randn(p.shape, generator=gen))


def test_default_targets_per_architecture():
    assert default_target_modules("bert") == ["query", "value"]
    assert default_target_modules("roberta") == ["query", "value"]
    assert default_target_modules("gpt2") == ["c_attn"]
    assert default_target_modules("llama") == ["q_proj", "v_proj"]
    assert default_target_modules("qwen2") == ["q_proj", "v_proj"]


def test_default_targets_for_an_unknown_architecture_is_an_error():
    with pytest.raises(FedMoEError, match="no default adapter.target_modules for model_type 't5'"):
        default_target_modules("t5")


def test_spec_defaults_follow_the_fedex_paper():
    spec = AdapterSpec.from_dict(None)
    assert (spec.type, spec.r, spec.alpha, spec.dropout, spec.use_rslora) == ("lora", 4, 8.0, 0.1, False)


def test_spec_with_unknown_key_is_an_error():
    with pytest.raises(FedMoEError, match=r"adapter has unknown keys \['rank'\]"):
        AdapterSpec.from_dict({"rank": 4})


def test_spec_with_unknown_type_is_an_error():
    with pytest.raises(FedMoEError, match="adapter.type='dora' is unknown"):
        AdapterSpec.from_dict({"type": "dora"})


@pytest.mark.parametrize(("model_type", "count"), [("bert", 4), ("roberta", 4), ("gpt2", 2), ("llama", 4), ("qwen2", 4)])
def test_adapted_layers_finds_every_adapted_layer_with_keys_in_the_state_dict(model_type, count):
    net = _net(model_type)
    layers = net.adapted_layers()
    state = net.state_dict()
    assert len(layers) == count
    for layer in layers:
        assert isinstance(layer, LoRALayer)
        assert {layer.base_key, layer.a_key, layer.b_key} <= set(state)
        assert state[layer.a_key].shape[0] == state[layer.b_key].shape[1] == 4


def test_adapted_layers_keys_are_relative_to_the_module_given_and_prefix():
    net = _net("bert")
    inner = adapted_layers(net.model, prefix="model.")
    assert [r.a_key for r in inner] == [r.a_key for r in net.adapted_layers()]
    assert inner[0].a_key.startswith("model.base_model.model.bert.encoder.layer.0.attention.self.query.lora_A")


def test_scaling_is_alpha_over_r():
    assert {layer.scaling for layer in _net("bert", r=4, alpha=8).adapted_layers()} == {2.0}


def test_scaling_is_alpha_over_sqrt_r_with_rslora():
    layers = _net("bert", r=4, alpha=8, use_rslora=True).adapted_layers()
    assert {layer.scaling for layer in layers} == {8 / math.sqrt(4)}
    layers = _net("bert", r=16, alpha=8, use_rslora=True).adapted_layers()
    assert {layer.scaling for layer in layers} == {2.0}


def test_scaling_follows_rank_and_alpha_patterns():
    net = _net("bert", r=4, alpha=8, rank_pattern={"value": 2}, alpha_pattern={"layer.1.attention.self.query": 16})
    by_name = {layer.name.split("bert.encoder.")[1]: layer for layer in net.adapted_layers()}
    assert by_name["layer.0.attention.self.query"].scaling == 2.0
    assert by_name["layer.1.attention.self.query"].scaling == 4.0
    assert by_name["layer.0.attention.self.value"].scaling == 8 / 2
    assert net.state_dict()[by_name["layer.0.attention.self.value"].a_key].shape[0] == 2


def test_gpt2_conv1d_layers_are_fan_in_fan_out_and_linear_layers_are_not():
    assert all(layer.fan_in_fan_out for layer in _net("gpt2").adapted_layers())
    assert not any(layer.fan_in_fan_out for layer in _net("bert").adapted_layers())


def _merged_output_matches_layer(net: HFSequenceClassifier, conv1d: bool, index: int = 0) -> None:
    net.eval()
    _randomise_adapters(net)
    state = net.state_dict()
    record = net.adapted_layers()[index]
    layer = net.get_submodule(record.name)
    merged = state[record.base_key] + to_base_layout(delta_weight(record, state), record.fan_in_fan_out)
    bias = state.get(record.base_key.replace(".weight", ".bias"))
    x = torch.randn(5, 32)  # hidden size of the tiny models
    expected = torch.addmm(bias, x, merged) if conv1d else F.linear(x, merged, bias)
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(layer.base_layer(x), expected)


def test_merging_to_base_layout_reproduces_a_gpt2_conv1d_lora_layer():
    _merged_output_matches_layer(_net("gpt2", use_rslora=True), conv1d=True)


def test_merging_to_base_layout_reproduces_a_non_square_linear_lora_layer():
    net = _net("qwen2", use_rslora=True)
    assert net.state_dict()[net.adapted_layers()[1].base_key].shape == (16, 32)  # v_proj, one KV head
    _merged_output_matches_layer(net, conv1d=False, index=1)


def test_vera_records_slice_the_shared_projections_per_layer():
    net = _net("llama", type="vera", r=8)
    layers = net.adapted_layers()
    state = net.state_dict()
    assert len(layers) == 4 and all(isinstance(layer, VeRALayer) for layer in layers)
    q, v = layers[0], layers[1]
    assert q.proj_a.shape == (8, 32) and q.proj_b.shape == (32, 8)
    assert v.proj_b.shape == (16, 8)  # one KV head of 16: v_proj is 32 -> 16
    assert {q.lambda_b_key, q.lambda_d_key, q.base_key} <= set(state)
    assert torch.equal(v.proj_b, q.proj_b[:16])


def test_vera_delta_matches_peft_delta_weight_on_conv1d():
    net = _net("gpt2", type="vera", r=8)
    _randomise_adapters(net)
    record = net.adapted_layers()[0]
    assert record.fan_in_fan_out
    layer = net.get_submodule(record.name)
    ours = to_base_layout(delta_weight(record, net.state_dict()), record.fan_in_fan_out)
    torch.testing.assert_close(ours, layer.get_delta_weight("default"))


def test_vera_merged_output_matches_the_layer():
    _merged_output_matches_layer(_net("gpt2", type="vera", r=8), conv1d=True)


def test_sorf_vera_builds_with_its_own_keys_and_records():
    net = _net("gpt2", type="sorf_vera", r=4, sorf_seed=7, dropout=0.0)
    layers = net.adapted_layers()
    assert len(layers) == 2 and all(isinstance(layer, SORFVeRALayer) for layer in layers)
    assert all(layer.fan_in_fan_out for layer in layers)
    assert {k for k in net.trainable_keys() if "sorf_" in k} == {
        k for layer in layers for k in (layer.d_scale_key, layer.d_angles_key)
    }
    assert any(".score." in k for k in net.trainable_keys())


def test_sorf_vera_merged_output_matches_the_layer():
    _merged_output_matches_layer(_net("gpt2", type="sorf_vera", r=4, train_b=True), conv1d=True)


def test_sorf_vera_with_an_unknown_key_is_an_error():
    with pytest.raises(FedMoEError, match=r"adapter has unknown keys \['sorf_sead'\] for sorf_vera"):
        _net("bert", type="sorf_vera", sorf_sead=1)


def test_prefix_is_prepended_to_every_key_of_vera_records():
    net = _net("bert", type="vera", r=8)
    plain, prefixed = adapted_layers(net.model), adapted_layers(net.model, prefix="model.")
    assert [r.lambda_b_key for r in prefixed] == ["model." + r.lambda_b_key for r in plain]
    assert set(r.lambda_d_key for r in prefixed) <= set(net.state_dict())


def test_spec_with_a_rank_below_one_is_an_error():
    with pytest.raises(FedMoEError, match="adapter.r=0 must be a positive integer"):
        AdapterSpec.from_dict({"r": 0})
