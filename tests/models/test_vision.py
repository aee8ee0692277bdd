"""Image classifiers and the network registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedmoe.models import build_network
from fedmoe.models import networks
from fedmoe.models.vision import CifarResNet18, DigitsCNN, FemnistCNN


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_femnist_cnn_has_leaf_parameter_count_and_accepts_flat_pixels():
    torch.manual_seed(0)
    model = FemnistCNN(62).eval()
    assert num_params(model) == 6_603_710
    images = torch.rand(3, 1, 28, 28)
    out = model(images)
    assert out.shape == (3, 62)
    torch.testing.assert_close(model(images.reshape(3, 784)), out)


def test_cifar_resnet18_has_torchvision_parameter_count_with_small_stem():
    torch.manual_seed(0)
    model = CifarResNet18(10)
    assert num_params(model) == 11_173_962
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert model.conv1.bias is None
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.fc.in_features == 512 and model.fc.out_features == 10


def test_cifar_resnet18_keeps_resolution_in_first_stage_and_downsamples_later():
    torch.manual_seed(0)
    model = CifarResNet18(7).eval()
    sizes = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[1:]))
        )
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert sizes == {
        "layer1": (64, 32, 32),
        "layer2": (128, 16, 16),
        "layer3": (256, 8, 8),
        "layer4": (512, 4, 4),
    }
    assert model.layer1[0].downsample is None
    for layer in (model.layer2, model.layer3, model.layer4):
        conv, bn = layer[0].downsample
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
        assert isinstance(bn, nn.BatchNorm2d)
        assert layer[1].downsample is None


def test_cifar_resnet18_is_initialised_like_torchvision():
    torch.manual_seed(0)
    model = CifarResNet18(10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    # Kaiming normal, fan-out, ReLU gain: std = sqrt(2 / (out_channels * 3 * 3)).
    std = model.layer4[0].conv2.weight.std().item()
    assert std == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)


def test_digits_cnn_maps_8x8_images_to_logits():
    torch.manual_seed(0)
    model = DigitsCNN(10).eval()
    images = torch.rand(4, 1, 8, 8)
    out = model(images)
    assert out.shape == (4, 10)
    torch.testing.assert_close(model(images.reshape(4, 64)), out)
    assert model.classifier[1].in_features == 32 * 4 * 4


@pytest.mark.parametrize(
    ("name", "cls"),
    [("femnist_cnn", FemnistCNN), ("cifar_resnet18", CifarResNet18), ("digits_cnn", DigitsCNN)],
)
def test_build_network_by_registered_name_sets_the_head_size(name, cls):
    model = build_network(name, 5)
    assert type(model) is cls
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert last_linear.out_features == 5


def test_build_network_accepts_a_dotted_class_path():
    model = build_network("fedmoe.models.vision.DigitsCNN", 3)
    assert isinstance(model, DigitsCNN)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)


def test_build_network_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="cifar_resnet18.*digits_cnn.*femnist_cnn"):
        build_network("resnet1000", 10)


def test_build_network_bad_dotted_path_is_a_value_error():
    with pytest.raises(ValueError, match="cannot import"):
        build_network("no_such_package.Model", 10)
    with pytest.raises(ValueError, match="no attribute"):
        build_network("fedmoe.models.vision.NoSuchModel", 10)


def test_register_network_makes_a_class_buildable_by_name(monkeypatch):
    monkeypatch.setattr(networks, "NETWORKS", dict(networks.NETWORKS))

    @networks.register_network("tiny_linear")
    class TinyLinear(nn.Linear):
        def __init__(self, num_classes: int, width: int = 4) -> None:
            super().__init__(width, num_classes)

    model = build_network("tiny_linear", 3, width=6)
    assert isinstance(model, TinyLinear) and model.weight.shape == (3, 6)
    with pytest.raises(ValueError, match="already registered"):
        networks.register_network("tiny_linear")(nn.Linear)
