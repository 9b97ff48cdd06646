"""Model zoo in plain torch.nn: VGG16, ResNet-18/50, MobileNetV2, written from scratch.

The architectures match torchvision's (ResNet attribute names too, so a torchvision ResNet
state_dict loads into them), minus Dropout: these models are for inference, and leaving it
out keeps torch.export graphs free of no-op nodes. No weights are downloaded; every
constructor draws its weights from ``seed`` and leaves the global torch RNG untouched.

BatchNorm layers get non-trivial statistics (``_init``): random affine weight/bias, running
mean/var calibrated on one random batch and then perturbed. With the default (0, 1) stats a
BN-folding bug that drops the mean or the variance would go unnoticed; with purely random
stats the activations of a 50-layer net drift off scale.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch
from torch import nn

# ---------------------------------------------------------------------------------- VGG16

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, input_size: int, num_classes: int, batch_norm: bool):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            layers += [nn.BatchNorm2d(v), nn.ReLU()] if batch_norm else [nn.ReLU()]
            c = v
        self.features = nn.Sequential(*layers)
        if input_size == 224:
            self.avgpool = nn.AdaptiveAvgPool2d(7)  # a no-op at 224, as in torchvision
            head = [nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                    nn.Linear(4096, num_classes)]
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(1)  # a no-op at 32
            head = [nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, num_classes)]
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16(input_size: int = 224, num_classes: int | None = None, batch_norm: bool = False,
          seed: int = 0) -> VGG:
    """VGG16: 13 3x3 convs (each followed by BN if ``batch_norm``, then ReLU), 5 max-pools, a head.

    ``input_size=224`` (ImageNet, default 1000 classes): AdaptiveAvgPool(7x7) - Linear(25088,
    4096) - ReLU - Linear(4096, 4096) - ReLU - Linear(4096, num_classes).
    ``input_size=32`` (CIFAR, default 10 classes): the feature map is 512 x 1 x 1 and the head is
    the common CIFAR one, Linear(512, 512) - ReLU - Linear(512, num_classes).
    """
    if input_size not in (32, 224):
        raise ValueError(f"vgg16: input_size must be 32 (CIFAR) or 224 (ImageNet), got {input_size!r}")
    n = num_classes or (1000 if input_size == 224 else 10)
    return _build(lambda: VGG(input_size, n, batch_norm), seed, (2, 3, input_size, input_size))


# ---------------------------------------------------------------------------------- ResNet

def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (torchvision): the stride sits on the 3x3 conv, not the 1x1."""
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = _downsample(cin, planes * 4, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block, depths: list[int], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, seed: int = 0) -> ResNet:
    return _build(lambda: ResNet(BasicBlock, [2, 2, 2, 2], num_classes), seed, (2, 3, 224, 224))


def resnet50(num_classes: int = 1000, seed: int = 0) -> ResNet:
    return _build(lambda: ResNet(Bottleneck, [3, 4, 6, 3], num_classes), seed, (2, 3, 224, 224))


# ---------------------------------------------------------------------------------- MobileNetV2

def _conv_bn_relu6(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t == 1) -> 3x3 depthwise -> 1x1 linear projection (no ReLU);
    residual add when the block keeps shape."""

    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        layers = [_conv_bn_relu6(cin, hidden)] if t != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper.
MOBILENET_V2_CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                    (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, cin = [_conv_bn_relu6(3, 32, 3, 2)], 32
        for t, c, n, s in MOBILENET_V2_CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu6(cin, 1280))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 1000, seed: int = 0) -> MobileNetV2:
    return _build(lambda: MobileNetV2(num_classes), seed, (2, 3, 224, 224))


# ---------------------------------------------------------------------------------- init

def _build(make: Callable[[], nn.Module], seed: int, calib_shape: tuple[int, ...]) -> nn.Module:
    """Construct and initialise from ``seed`` in a forked RNG, so that the caller's global RNG
    state is neither used nor advanced. Returns the model in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        _init(model, calib_shape)
    return model.eval()


@torch.no_grad()
def _init(model: nn.Module, calib_shape: tuple[int, ...]) -> None:
    bns = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):  # torchvision's scheme; keeps activations O(1) without BN
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):  # LeCun normal, not torchvision's N(0, 0.01): that
            # shrinks the logits until the random biases dominate them
            nn.init.normal_(m.weight, 0, m.in_features ** -0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            bns.append(m)
        # Nonzero biases (torchvision uses zeros) so that a sparse op dropping them is caught.
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.uniform_(-0.05, 0.05)
    if not bns:
        return
    # Calibrate running stats on one random batch (momentum=None: plain average, so the stats
    # are exactly that batch's), then perturb them so they are not the batch's exact moments.
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(torch.randn(calib_shape))
    for m in bns:
        m.momentum = 0.1
        m.running_mean += 0.2 * m.running_var.sqrt() * torch.randn_like(m.running_mean)
        m.running_var *= torch.empty_like(m.running_var).uniform_(0.7, 1.4)


# ---------------------------------------------------------------------------------- registry

class ModelSpec(NamedTuple):
    make: Callable[..., nn.Module]
    input_shape: tuple[int, int, int, int]  # example input, batch 1 (NCHW)
    input_sizes: tuple[int, ...] = (224,)  # what ``input_size`` may be; only VGG builds a head per size


MODELS: dict[str, ModelSpec] = {
    "vgg16": ModelSpec(partial(vgg16, input_size=224), (1, 3, 224, 224), (32, 224)),
    "vgg16_cifar": ModelSpec(partial(vgg16, input_size=32), (1, 3, 32, 32), (32, 224)),
    "resnet18": ModelSpec(resnet18, (1, 3, 224, 224)),
    "resnet50": ModelSpec(resnet50, (1, 3, 224, 224)),
    "mobilenet_v2": ModelSpec(mobilenet_v2, (1, 3, 224, 224)),
}


def example_input(shape, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """The seeded random input the tools feed a zoo model: the same numbers in every run."""
    return torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(seed))


def get_model(name: str, **kw) -> tuple[nn.Module, tuple[int, int, int, int]]:
    """``(model in eval mode, example input shape)``; ``kw`` go to the constructor
    (``seed``, ``num_classes``, and for VGG ``batch_norm``, ``input_size``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    shape = spec.input_shape
    if "input_size" in kw:
        size = kw["input_size"] if len(spec.input_sizes) > 1 else kw.pop("input_size")
        if isinstance(size, bool) or not isinstance(size, int) or size not in spec.input_sizes:
            raise ValueError(f"input_size: {name} takes {' or '.join(map(str, spec.input_sizes))}, got {size!r}")
        shape = (*shape[:2], size, size)
    return spec.make(**kw), shape
