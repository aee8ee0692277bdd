"""The SORF-VeRA tuner layer: forward = base(x) + delta W x, merge/unmerge/disable as PEFT layers,
stable state-dict keys that round-trip, frozen projections, PEFT's VeRA projections, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import VeraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2Model
from transformers.pytorch_utils import Conv1D

from fedmoe.algorithms.lora.sorf_vera import sorf_matrix
from fedmoe.errors import FedMoEError
from fedmoe.models.sorf_vera import SORFVeRAConfig, SORFVeRALinear, apply_sorf_vera, sorf_vera_layers


class Net(nn.Module):
    """A non-square nn.Linear (6 -> 10), a GPT-2 Conv1D (10 -> 4) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.c1d, self.head = nn.Linear(6, 10), Conv1D(4, 10), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c1d(torch.relu(self.lin(x))))


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = SORFVeRAConfig(r=3, target_modules=["lin", "c1d"], modules_to_save=["head"], **kw)
    model = apply_sorf_vera(Net(), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every adapter tensor off its init so each one matters
        for name, p in model.named_parameters():
            if "sorf_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["lin", "c1d"])
def test_forward_is_base_plus_effective_delta(name):
    layer = _model().get_submodule(name)
    x = torch.randn(2, 5, layer.in_features)
    delta = layer.get_delta_weight("default")  # base layout: d_in x d_out for Conv1D
    w = delta if layer.fan_in_fan_out else delta.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ w, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_and_disable_behave_as_peft_layers():
    model = _model()
    x = torch.randn(4, 6)
    with torch.no_grad():
        before = model(x)
        base_before = {n: model.get_submodule(n).get_base_weight().clone() for n in ("lin", "c1d")}
        for n in ("lin", "c1d"):
            model.get_submodule(n).merge()
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
        for n in ("lin", "c1d"):
            model.get_submodule(n).unmerge()
            torch.testing.assert_close(model.get_submodule(n).get_base_weight(), base_before[n], rtol=1e-6, atol=1e-6)
        for n in ("lin", "c1d"):
            model.get_submodule(n).enable_adapters(False)
        bare = model.head(model.c1d.base_layer(torch.relu(model.lin.base_layer(x))))
        torch.testing.assert_close(model(x), bare)


def test_state_dict_keys_are_stable_and_round_trip(tmp_path):
    model = _model()
    keys = list(model.state_dict())
    assert keys == [
        "lin.base_layer.weight", "lin.base_layer.bias", "lin.sorf_A.default", "lin.sorf_B.default",
        "lin.sorf_S.default", "lin.sorf_b_real.default", "lin.sorf_b_imag.default", "lin.sorf_d_scale.default",
        "lin.sorf_d_angles.default", "c1d.base_layer.weight", "c1d.base_layer.bias", "c1d.sorf_A.default",
        "c1d.sorf_B.default", "c1d.sorf_S.default", "c1d.sorf_b_real.default", "c1d.sorf_b_imag.default",
        "c1d.sorf_d_scale.default", "c1d.sorf_d_angles.default", "head.weight", "head.bias",
    ]
    torch.save(model.state_dict(), tmp_path / "sorf.pt")
    torch.manual_seed(123)  # another base init: everything must come from the file
    fresh = apply_sorf_vera(Net(), SORFVeRAConfig(r=3, target_modules=["lin", "c1d"], modules_to_save=["head"]))
    fresh.load_state_dict(torch.load(tmp_path / "sorf.pt"))
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_without_save_projection_the_projections_rebuild_from_the_seeds():
    model = _model(save_projection=False)
    assert not any(".sorf_A." in k or ".sorf_B." in k or ".sorf_S." in k for k in model.state_dict())
    again = _model(save_projection=False)
    for n in ("lin", "c1d"):
        a, b = model.get_submodule(n), again.get_submodule(n)
        assert torch.equal(a.sorf_A["default"], b.sorf_A["default"])
        assert torch.equal(a.sorf_S["default"], b.sorf_S["default"])
    torch.testing.assert_close(model.lin.sorf_S["default"], sorf_matrix(10, 42))


def test_only_scale_angles_and_head_train_and_projections_are_buffers():
    model = _model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "lin.sorf_d_scale.default", "lin.sorf_d_angles.default", "c1d.sorf_d_scale.default",
        "c1d.sorf_d_angles.default", "head.weight", "head.bias",
    }
    assert not any("sorf_A" in n or "sorf_B" in n or "sorf_S" in n for n, _ in model.named_parameters())
    model(torch.randn(4, 6)).sum().backward()
    assert model.lin.sorf_d_angles["default"].grad.abs().sum() > 0
    assert model.c1d.sorf_d_scale["default"].grad is not None
    with_b = {n for n, p in _model(train_b=True).named_parameters() if p.requires_grad}
    assert with_b - trainable == {f"{n}.sorf_b_{part}.default" for n in ("lin", "c1d") for part in ("real", "imag")}


def test_projections_equal_peft_vera_projections_for_the_same_key():
    torch.manual_seed(0)
    with warnings.catch_warnings():  # PEFT notes that it switches fan_in_fan_out on for the Conv1D
        warnings.simplefilter("ignore", UserWarning)
        vera = get_peft_model(Net(), VeraConfig(r=3, target_modules=["lin", "c1d"], projection_prng_key=5))
    ours = apply_sorf_vera(Net(), SORFVeRAConfig(r=3, target_modules=["lin", "c1d"], projection_prng_key=5))
    assert torch.equal(ours.lin.sorf_A["default"], vera.base_model.vera_A["default"])
    assert torch.equal(ours.lin.sorf_B["default"], vera.base_model.vera_B["default"])


def test_initial_delta_is_d_initial_times_s_b_a_and_zero_with_d_initial_zero():
    torch.manual_seed(0)
    model = apply_sorf_vera(Net(), SORFVeRAConfig(r=3, target_modules=["lin"], d_initial=0.1))
    lin = model.lin
    want = 0.1 * lin.sorf_S["default"] @ lin.sorf_B["default"][:10] @ lin.sorf_A["default"][:, :6]
    torch.testing.assert_close(lin.get_delta_weight("default"), want)
    zero = apply_sorf_vera(Net(), SORFVeRAConfig(r=3, target_modules=["lin"], d_initial=0.0))
    assert float(zero.lin.get_delta_weight("default").detach().abs().max()) == 0.0


def test_layer_records_name_keys_of_the_state_dict():
    model = _model()
    keys = model.state_dict().keys()
    layers = sorf_vera_layers(model)
    assert [(layer.name, layer.fan_in_fan_out) for layer in layers] == [("lin", False), ("c1d", True)]
    for layer in layers:
        assert {layer.base_key, layer.b_real_key, layer.b_imag_key, layer.d_scale_key, layer.d_angles_key} <= keys
        module = model.get_submodule(layer.name)
        assert layer.proj_a.shape == (3, module.in_features) and layer.sorf.shape == (module.out_features,) * 2


def test_gpt2_attention_trains_through_sorf_vera():
    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = apply_sorf_vera(GPT2Model(cfg), SORFVeRAConfig(r=2, target_modules=["c_attn", "c_proj"]))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, SORFVeRALinear)]
    assert wrapped == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_proj"]
    out = model(input_ids=torch.randint(0, 32, (2, 5))).last_hidden_state
    out.sum().backward()
    assert model.h[0].attn.c_attn.sorf_d_scale["default"].grad is not None


def test_bad_targets_and_odd_output_sizes_are_one_line_errors():
    with pytest.raises(FedMoEError, match="match no") as err:
        apply_sorf_vera(Net(), SORFVeRAConfig(r=3, target_modules=["query"]))
    assert "\n" not in str(err.value)
    odd = nn.Sequential(nn.Linear(4, 5))
    with pytest.raises(FedMoEError, match="even number of output features"):
        apply_sorf_vera(odd, SORFVeRAConfig(r=2, target_modules=["0"]))
