"""A ResNet (v1.5, bottleneck blocks) backbone with frozen batch norm, as DETR uses it.

Module names follow torchvision's (`conv1`, `bn1`, `layer1`..`layer4`, `downsample`), so a
torchvision/DETR state dict maps onto it name for name. There is no pooling head and no `fc`:
the backbone returns the last stage's feature map (stride 32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine terms are fixed buffers: nothing here trains.

    DETR freezes every backbone batch norm: with 2-4 large images per GPU, batch statistics
    are too noisy to update, so the pretrained ones are kept as a per-channel scale and shift.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride, as in ResNet v1.5) -> 1x1 expand, plus a shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                FrozenBatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """`layers` blocks per stage: (3, 4, 6, 3) is ResNet-50, (3, 4, 23, 3) ResNet-101.

    `width` is the stem's channel count and the first stage's bottleneck width (64 in the
    paper); stage i is 2**i times wider, so the output has `width * 8 * 4` channels.
    """

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        in_channels = width
        stages = []
        for i, n_blocks in enumerate(layers):
            stage_width, stride = width * 2**i, 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(Bottleneck(in_channels, stage_width, stride if j == 0 else 1))
                in_channels = stage_width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = in_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # The paper starts from ImageNet weights; from scratch, with identity batch norms, every
        # residual branch adds its variance and ResNet-101's features reach ~1e4. Scaling each
        # branch's last conv by depth**-1/4 (Fixup's rule for 3-layer branches) keeps them O(1).
        branch_scale = sum(layers) ** -0.25
        for m in self.modules():
            if isinstance(m, Bottleneck):
                with torch.no_grad():
                    m.conv3.weight.mul_(branch_scale)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> features (B, out_channels, H/32, W/32)."""
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
