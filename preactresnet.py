"""PreActResNet-18 as used in the fast adversarial training literature.

The model maps images in [0, 1] to logits, so it can be handed to any attack
library as it is (an input normalisation, if any, is its first layer).
``model(x, return_features=True)`` also returns the penultimate features that
MIX-KL's consistency term compares: the pooled output of the last block, with
no BN-ReLU after it.
"""
import torch.nn as nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        # The projection shortcut reads the pre-activated input, as in He et al. 2016.
        shortcut = self.shortcut(out) if hasattr(self, 'shortcut') else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def stage(block, in_planes, planes, num_blocks, stride):
    """num_blocks blocks in a row: the first maps in_planes to planes at ``stride``."""
    return nn.Sequential(*[block(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                           for i in range(num_blocks)])


class PreActResNet(nn.Module):
    def __init__(self, num_blocks, num_classes=10, width=64, image_size=32, normalize=None):
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        self.normalize = normalize or nn.Identity()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.layer1 = stage(PreActBlock, width, width, num_blocks[0], stride=1)
        self.layer2 = stage(PreActBlock, width, 2 * width, num_blocks[1], stride=2)
        self.layer3 = stage(PreActBlock, 2 * width, 4 * width, num_blocks[2], stride=2)
        self.layer4 = stage(PreActBlock, 4 * width, 8 * width, num_blocks[3], stride=2)
        # A 4x4 average pool, as in the authors' models: one 512-d vector per 32x32 image,
        # a 2x2 grid of them (2048-d) per 64x64 Tiny-ImageNet image.
        self.linear = nn.Linear(8 * width * (image_size // 32) ** 2, num_classes)

    def forward(self, x, return_features=False):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(self.normalize(x))))))
        features = F.avg_pool2d(out, 4).flatten(1)
        logits = self.linear(features)
        return (logits, features) if return_features else logits


def PreActResNet18(num_classes=10, width=64, image_size=32, normalize=None):
    """PreActResNet-18: blocks [2, 2, 2, 2], widths width x (1, 2, 4, 8)."""
    return PreActResNet([2, 2, 2, 2], num_classes, width, image_size, normalize)
