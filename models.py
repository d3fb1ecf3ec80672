"""The architectures a run can train (--arch), and how a checkpoint names its own.

Every model maps images in [0, 1] to logits, and ``model(x, return_features=True)``
also returns the penultimate features MIX-KL's consistency term compares. Where
a dataset is normalised (Tiny-ImageNet, as the authors did), the normalisation
is the model's first layer, so attacks and AutoAttack still see [0, 1] images.

- ``preactresnet18`` (preactresnet.py): the default here. Features: the pooled
  output of the last block, with no ReLU after it.
- ``resnet18``: the authors' default network. Features: the pooled output of the
  last block, after its ReLU.
- ``wrn34-10``: WideResNet-34-10, the standard network of robustness
  leaderboards (the key names of RobustBench's). Features: the pooled 640-d
  vector after the final BN-ReLU.

``width`` is the base width of the ResNets (64: stages of 64-128-256-512
channels) and the widen factor k of the WideResNet (10: stages of 160-320-640).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from preactresnet import PreActResNet18, stage

# The per-channel mean and std the authors normalised Tiny-ImageNet with (ImageNet's).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The input normalisation of each dataset's models: none for CIFAR, as in the paper.
NORMALIZATION = {'tinyimagenet': (IMAGENET_MEAN, IMAGENET_STD)}


class Normalize(nn.Module):
    """(x - mean) / std per channel. Constants, not weights: they are not in the state_dict."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


# ---------------------------------------------------------------------------
# ResNet-18 (He et al. 2016), the CIFAR variant: 3x3 stem, no max-pool

class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_blocks, num_classes=10, width=64, image_size=32, normalize=None):
        super().__init__()
        self.num_classes, self.width = num_classes, width
        self.normalize = normalize or nn.Identity()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = stage(BasicBlock, width, width, num_blocks[0], stride=1)
        self.layer2 = stage(BasicBlock, width, 2 * width, num_blocks[1], stride=2)
        self.layer3 = stage(BasicBlock, 2 * width, 4 * width, num_blocks[2], stride=2)
        self.layer4 = stage(BasicBlock, 4 * width, 8 * width, num_blocks[3], stride=2)
        self.linear = nn.Linear(8 * width * (image_size // 32) ** 2, num_classes)

    def forward(self, x, return_features=False):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        features = F.avg_pool2d(out, 4).flatten(1)  # after the last block's ReLU
        logits = self.linear(features)
        return (logits, features) if return_features else logits


def ResNet18(num_classes=10, width=64, image_size=32, normalize=None):
    """ResNet-18: basic blocks [2, 2, 2, 2], widths width x (1, 2, 4, 8)."""
    return ResNet([2, 2, 2, 2], num_classes, width, image_size, normalize)


# ---------------------------------------------------------------------------
# WideResNet (Zagoruyko & Komodakis 2016), as in the robustness literature

class WideBlock(nn.Module):
    """Pre-activation block; a 1x1 shortcut (on the activated input) where the shape changes."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == planes and stride == 1
        self.convShortcut = None if self.equal_in_out else \
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        shortcut = x if self.equal_in_out else self.convShortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + shortcut


class NetworkBlock(nn.Module):
    def __init__(self, num_layers, in_planes, planes, stride):
        super().__init__()
        self.layer = stage(WideBlock, in_planes, planes, num_layers, stride)

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth=34, num_classes=10, width=10, image_size=32, normalize=None):
        super().__init__()
        assert (depth - 4) % 6 == 0, 'WideResNet depth is 6n + 4'
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.num_classes, self.width = num_classes, width
        self.normalize = normalize or nn.Identity()
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3] * (image_size // 32) ** 2, num_classes)
        # The usual WideResNet initialisation: He normal (fan out) convolutions, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x, return_features=False):
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        out = self.relu(self.bn1(out))
        features = F.avg_pool2d(out, 8).flatten(1)  # 640-d per 32x32 image
        logits = self.fc(features)
        return (logits, features) if return_features else logits


def WideResNet34(num_classes=10, width=10, image_size=32, normalize=None):
    """WideResNet-34-k with k = width: 5 blocks per stage, stages of 16k, 32k, 64k channels."""
    return WideResNet(34, num_classes, width, image_size, normalize)


# ---------------------------------------------------------------------------
# --arch

@dataclass(frozen=True)
class Arch:
    build: object        # (num_classes, width, image_size, normalize) -> nn.Module
    default_width: int   # what --width means: see the module docstring
    head: str            # the name of the final linear layer
    width_key: str       # the state_dict entry whose first dimension gives the width ...
    width_per: int       # ... once divided by this


ARCHS = {
    'preactresnet18': Arch(PreActResNet18, 64, 'linear', 'conv1.weight', 1),
    'resnet18': Arch(ResNet18, 64, 'linear', 'conv1.weight', 1),
    'wrn34-10': Arch(WideResNet34, 10, 'fc', 'block3.layer.0.conv1.weight', 64),
}


def build_model(arch, num_classes, width=None, image_size=32, normalization=None):
    """A fresh ``arch`` network; ``normalization`` = (mean, std) or None (images used as they are)."""
    spec = ARCHS[arch]
    normalize = Normalize(*normalization) if normalization is not None else None
    return spec.build(num_classes, width or spec.default_width, image_size, normalize)


def detect_arch(state_dict):
    """The --arch name of a state_dict's architecture, or None if it is none of ours.

    ResNet-18's blocks have a BN after conv1 where PreActResNet-18's have it before,
    so 'layer1.0.bn1' exists in both; the stem's 'bn1' tells them apart.
    """
    if 'block1.layer.0.conv1.weight' in state_dict:
        return 'wrn34-10'
    if 'layer1.0.conv1.weight' not in state_dict:
        return None
    return 'resnet18' if 'bn1.weight' in state_dict else 'preactresnet18'


def width_of(arch, state_dict):
    """The --width a state_dict of ``arch`` was built with."""
    spec = ARCHS[arch]
    return state_dict[spec.width_key].shape[0] // spec.width_per


def num_classes_of(arch, state_dict):
    """The number of classes of a state_dict of ``arch``."""
    return state_dict[f'{ARCHS[arch].head}.weight'].shape[0]
