"""Replaces downloaded torchvision models with small look-alikes for end-to-end tests.

Each architecture keeps the coupling patterns of its torchvision namesake (residual adds
with downsample shortcuts, bottlenecks, grouped and depthwise convolutions, squeeze-excite
products, pre-activation dense blocks with concats, channel split and shuffle, fire and
inception concats, Flatten into Linear) at widths of a few channels, so each model is a
few kilobytes and exports in well under a second. BatchNorm running statistics and affine
parameters are randomised: with torch's defaults (mean 0, var 1, scale 1, shift 0) folding
them would be a no-op and a broken fold would go unnoticed.

Only the test fixtures import this module (it needs torch, a test-only dependency).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "INPUT_SHAPES", "build", "export"]

logger = logging.getLogger(__name__)


def _cbr(cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1, act: type = nn.ReLU):
    """Conv (no bias) + BatchNorm + activation, the building brick of most families."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------- ResNet / ResNeXt
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = (
            _cbr(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv1 = _cbr(cin, width, 1)
        self.conv2 = _cbr(width, width, 3, stride, g=groups)
        self.conv3 = _cbr(width, cout, 1, act=None)
        self.relu = nn.ReLU()
        self.downsample = (
            _cbr(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet(nn.Module):
    def __init__(self, blocks: list[nn.Module], width: int, classes: int = 10):
        super().__init__()
        self.stem = _cbr(3, 8)
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18() -> nn.Module:
    # stage 1: one identity block at 8; stage 2: a downsampling block and an identity block
    return ResNet([BasicBlock(8, 8), BasicBlock(8, 16, 2), BasicBlock(16, 16)], 16)


def resnet50() -> nn.Module:
    return ResNet([Bottleneck(8, 4, 16), Bottleneck(16, 4, 16), Bottleneck(16, 8, 32, 2)], 32)


def resnext() -> nn.Module:
    return ResNet([Bottleneck(8, 16, 16, groups=4), Bottleneck(16, 16, 16, groups=4)], 16)


# ---------------------------------------------------------------------- MobileNets, EfficientNet
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_cbr(cin, hidden, 1, act=nn.ReLU6))
        layers += [_cbr(hidden, hidden, 3, stride, g=hidden, act=nn.ReLU6)]
        layers += [_cbr(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2() -> nn.Module:
    return nn.Sequential(
        _cbr(3, 8, s=2, act=nn.ReLU6),
        InvertedResidual(8, 8, 1, 1),
        InvertedResidual(8, 12, 2, 6),
        InvertedResidual(12, 12, 1, 6),
        _cbr(12, 32, 1, act=nn.ReLU6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Dropout(0.2),
        nn.Linear(32, 10),
    )


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int, act: type, gate: type):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x):
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class MBConv(nn.Module):
    """MobileNetV3 / EfficientNet block: expand, depthwise, squeeze-excite, project."""

    def __init__(self, cin: int, cout: int, expand: int, se: int, act: type, gate: type):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_cbr(cin, hidden, 1, act=act))
        layers += [
            _cbr(hidden, hidden, 3, g=hidden, act=act),
            SqueezeExcite(hidden, se, nn.ReLU if gate is nn.Hardsigmoid else nn.SiLU, gate),
            _cbr(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


def mobilenet_v3() -> nn.Module:
    return nn.Sequential(
        _cbr(3, 8, s=2, act=nn.Hardswish),
        MBConv(8, 8, 2, 4, nn.Hardswish, nn.Hardsigmoid),
        _cbr(8, 32, 1, act=nn.Hardswish),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(32, 24),
        nn.Hardswish(),
        nn.Dropout(0.2),
        nn.Linear(24, 10),
    )


def efficientnet_b0() -> nn.Module:
    return nn.Sequential(
        _cbr(3, 8, s=2, act=nn.SiLU),
        MBConv(8, 8, 4, 2, nn.SiLU, nn.Sigmoid),
        _cbr(8, 32, 1, act=nn.SiLU),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Dropout(0.2),
        nn.Linear(32, 10),
    )


# ---------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    """Pre-activation: BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 on the concat of all features so far."""

    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, features: list[torch.Tensor]):
        x = torch.cat(features, 1)
        return self.conv2(self.relu(self.norm2(self.conv1(self.relu(self.norm1(x))))))


class DenseBlock(nn.Module):
    def __init__(self, layers: int, cin: int, growth: int, bn_size: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(cin + i * growth, growth, bn_size) for i in range(layers)
        )

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_cbr(3, 8), nn.MaxPool2d(2))
        self.block1 = DenseBlock(3, 8, 4)  # 8 + 3*4 = 20
        self.transition = nn.Sequential(
            nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 10, 1, bias=False), nn.AvgPool2d(2)
        )
        self.block2 = DenseBlock(2, 10, 4)  # 10 + 2*4 = 18
        self.norm5 = nn.BatchNorm2d(18)
        self.fc = nn.Linear(18, 10)

    def forward(self, x):
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = nn.functional.relu(self.norm5(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def densenet() -> nn.Module:
    return DenseNet()


# ---------------------------------------------------------------------- ShuffleNetV2
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    # As torchvision writes it: sizes read from the tensor, so the export computes them.
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, -1, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                _cbr(cin, cin, 3, stride, g=cin, act=None), _cbr(cin, half, 1)
            )
        self.branch2 = nn.Sequential(
            _cbr(cin if stride > 1 else half, half, 1),
            _cbr(half, half, 3, stride, g=half, act=None),
            _cbr(half, half, 1),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_cbr(3, 8), nn.MaxPool2d(3, 2, 1))
        self.stage = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1))
        self.conv5 = _cbr(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.conv5(self.stage(self.stem(x)))
        return self.fc(x.mean([2, 3]))


def shufflenet_v2() -> nn.Module:
    return ShuffleNetV2()


# ---------------------------------------------------------------------- SqueezeNet, GoogLeNet, VGG
class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1x1(x)), self.relu(self.expand3x3(x))], 1)


def squeezenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(16, 4, 8, 8),
        Fire(16, 4, 8, 8),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(16, 6, 12, 12),
        nn.Dropout(0.5),
        nn.Conv2d(24, 10, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
    )


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int):
        super().__init__()
        self.branch1 = _cbr(cin, c1, 1)
        self.branch2 = nn.Sequential(_cbr(cin, c3r, 1), _cbr(c3r, c3, 3))
        # torchvision's "5x5" branch is a 3x3 conv too
        self.branch3 = nn.Sequential(_cbr(cin, c5r, 1), _cbr(c5r, c5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), _cbr(cin, pool, 1))

    def forward(self, x):
        branches = (self.branch1, self.branch2, self.branch3, self.branch4)
        return torch.cat([b(x) for b in branches], 1)


def googlenet() -> nn.Module:
    return nn.Sequential(
        _cbr(3, 8),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        Inception(8, 4, 4, 6, 2, 3, 3),  # 16
        Inception(16, 6, 4, 8, 2, 4, 4),  # 22
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Dropout(0.2),
        nn.Linear(22, 10),
    )


def vgg() -> nn.Module:
    return nn.Sequential(
        _cbr(3, 8),
        _cbr(8, 8),
        nn.MaxPool2d(2),
        _cbr(8, 16),
        nn.MaxPool2d(2),
        _cbr(16, 16),
        nn.MaxPool2d(2),
        nn.Flatten(1),  # 16 channels x 4 x 4
        nn.Linear(256, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, 10),
    )


def depthwise_multiplier() -> nn.Module:
    """A depthwise conv with channel multiplier 2 (groups = C_in, C_out = 2 C_in)."""
    return nn.Sequential(
        _cbr(3, 8),
        _cbr(8, 16, 3, g=8),
        _cbr(16, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(16, 10),
    )


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnext": resnext,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3": mobilenet_v3,
    "efficientnet_b0": efficientnet_b0,
    "densenet": densenet,
    "shufflenet_v2": shufflenet_v2,
    "squeezenet": squeezenet,
    "googlenet": googlenet,
    "vgg": vgg,
    "depthwise_multiplier": depthwise_multiplier,
}

#: Input shape per architecture (batch 1; the exported batch axis is dynamic).
INPUT_SHAPES: dict[str, tuple[int, ...]] = {name: (1, 3, 32, 32) for name in ARCHITECTURES}


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine terms (from torch's current seed), so that
    folding them into the convolutions is not a no-op."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return model


def build(name: str, *, seed: int = 0) -> nn.Module:
    """The architecture in eval mode, with random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    return randomize_batchnorm(ARCHITECTURES[name]()).eval()


def export(
    name: str, path: str | os.PathLike, *, seed: int = 0, resolution: int | None = None
) -> Path:
    """Exports the architecture to ONNX (opset 17, dynamic batch) with BatchNorm kept.

    `TrainingMode.PRESERVE` without constant folding stops torch from folding BatchNorm
    into the preceding Conv itself, so tailor's own fold is what the tests exercise.
    Torch's export warnings are silenced: they concern torch's exporter, not the model.
    `resolution` exports at another square input size than :data:`INPUT_SHAPES`.
    """
    path = Path(path)
    model = build(name, seed=seed)
    shape = INPUT_SHAPES[name]
    if resolution is not None:
        shape = (*shape[:2], resolution, resolution)
    x = torch.randn(*shape)
    sink = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
        torch.no_grad(),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
    logger.debug("exported %s to %s", name, path)
    return path
