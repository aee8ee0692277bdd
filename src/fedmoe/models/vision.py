"""Image classifiers of the paper's settings, written with torch only.

FEMNIST uses the LEAF CNN, CIFAR-10 the CIFAR variant of ResNet-18 (3x3 stride-1 stem, no
max-pool) and the digits quickstart a small CNN. Every network maps a batch to B x C logits, so
any of them can serve as a client model, a Fed-MoE expert or (with a K-way head) a gate.
"""

from __future__ import annotations

from torch import Tensor, nn


class FemnistCNN(nn.Module):
    """LEAF's FEMNIST CNN: two conv5x5 + max-pool stages, then FC 3136-2048-C.

    Input B x 1 x 28 x 28, or B x 784 (flattened LEAF pixels), which is reshaped.
    """

    def __init__(self, num_classes: int = 62) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(7 * 7 * 64, 2048),
            nn.ReLU(),
            nn.Linear(2048, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B x C) of a batch of 28 x 28 grey images."""
        if x.dim() == 2:
            x = x.reshape(-1, 1, 28, 28)
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, identity or 1x1 conv + BN shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet18(nn.Module):
    """ResNet-18 for 32 x 32 images: torchvision's layout with a 3x3 stride-1 stem and no max-pool.

    BasicBlock stages [2, 2, 2, 2] of widths 64/128/256/512, adaptive average pool, FC 512-C;
    initialised as torchvision does (Kaiming normal fan-out for convs, BN weight 1 and bias 0).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(64, 64, stride=1)
        self.layer2 = self._make_layer(64, 128, stride=2)
        self.layer3 = self._make_layer(128, 256, stride=2)
        self.layer4 = self._make_layer(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B x C) of a batch of B x 3 x H x W images."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class DigitsCNN(nn.Module):
    """Small CNN for scikit-learn's 8 x 8 digits: conv3x3 16, conv3x3 32, pool2, FC 512-64-C.

    Input B x 1 x 8 x 8, or B x 64 (flattened pixels), which is reshaped.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B x C) of a batch of 8 x 8 grey images."""
        if x.dim() == 2:
            x = x.reshape(-1, 1, 8, 8)
        return self.classifier(self.features(x))
