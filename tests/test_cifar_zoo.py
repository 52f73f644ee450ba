"""The CIFAR KD model zoo (RepDistiller / mdistiller architectures) as kdmtl trunks, checked
against test-only transcriptions of RepDistiller's own model definitions (below): exact
parameter counts as 100-class classifiers, the same function (weights copied over, logits and
features compared), the same initialisation rule, kdmtl's stage layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdmtl_cli.data import TargetSpec
from kdmtl_cli.models import build_model, count_parameters
from kdmtl_cli.models.cifar_mobilenet import MobileNetV2Trunk
from kdmtl_cli.models.cifar_resnet import _ARCHS as RESNETS, CifarResNetTrunk
from kdmtl_cli.models.cifar_vgg import _CONFIGS as VGGS, VGGTrunk
from kdmtl_cli.models.cifar_wrn import WideResNetTrunk
from kdmtl_cli.models.multitask import MultiTaskModel
from kdmtl_cli.schema import ModelConfig
from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds

_load_kinds()

# ---------------------------------------------------------------------------------------------
# Test-only reference builders, transcribed in plain torch from RepDistiller's models/
# (github:HobbitLong/RepDistiller @ b84f547c5db6a35318d4671d7d5c4de74c822403; mdistiller's
# mdistiller/models/cifar/ copies are the same networks): resnet.py, wrn.py, vgg.py (*_bn, which
# model_dict registers as vgg8 .. vgg19), mobilenetv2.py (mobile_half), ShuffleNetv1.py
# (ShuffleV1), ShuffleNetv2.py (ShuffleV2). Module registration order, layer hyper-parameters,
# forward and init follow those files; each forward returns (logits, feats, preact_feats) with
# RepDistiller's feature lists (f0 .. f_last, pooled vector left out).
# ---------------------------------------------------------------------------------------------
class RefResBlock(nn.Module):  # resnet.py BasicBlock
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        preact = out
        return F.relu(out), preact


class RefResNet(nn.Module):  # resnet.py ResNet, block_name='basicblock'
    def __init__(self, depth, num_filters, num_classes=100):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)
        ref_init_resnet(self)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [RefResBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [RefResBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        feats, pre = [x], []
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                x, p = block(x)
            feats.append(x)
            pre.append(p)
        x = self.avgpool(x).view(x.size(0), -1)
        return self.fc(x), feats, pre


def ref_init_resnet(net):  # resnet.py l. 130-135
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class RefWideBlock(nn.Module):  # wrn.py BasicBlock, dropRate 0
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride,
                                                                padding=0, bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class RefNetworkBlock(nn.Module):  # wrn.py NetworkBlock
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RefWideBlock(i == 0 and in_planes or out_planes, out_planes,
                                                  i == 0 and stride or 1) for i in range(nb_layers)])

    def forward(self, x):
        return self.layer(x)


class RefWideResNet(nn.Module):  # wrn.py WideResNet
    def __init__(self, depth, widen_factor, num_classes=100):
        super().__init__()
        nChannels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, nChannels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = RefNetworkBlock(n, nChannels[0], nChannels[1], 1)
        self.block2 = RefNetworkBlock(n, nChannels[1], nChannels[2], 2)
        self.block3 = RefNetworkBlock(n, nChannels[2], nChannels[3], 2)
        self.bn1 = nn.BatchNorm2d(nChannels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(nChannels[3], num_classes)
        self.nChannels = nChannels[3]
        ref_init_wrn(self)

    def forward(self, x):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        out = self.relu(self.bn1(f3))
        out = F.avg_pool2d(out, 8).view(-1, self.nChannels)
        pre = [self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2), self.bn1(f3)]
        return self.fc(out), [f0, f1, f2, f3], pre


def ref_init_wrn(net):  # wrn.py l. 78-86
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2. / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.bias.data.zero_()


REF_VGG_CFG = {  # vgg.py cfg
    'A': [[64], [128], [256, 256], [512, 512], [512, 512]],
    'B': [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    'D': [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    'E': [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    'S': [[64], [128], [256], [512], [512]],
}


class RefVGG(nn.Module):  # vgg.py VGG, batch_norm=True
    def __init__(self, cfg, num_classes=100):
        super().__init__()
        self.block0 = self._make_layers(cfg[0], 3)
        self.block1 = self._make_layers(cfg[1], cfg[0][-1])
        self.block2 = self._make_layers(cfg[2], cfg[1][-1])
        self.block3 = self._make_layers(cfg[3], cfg[2][-1])
        self.block4 = self._make_layers(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        ref_init_vgg_mbv2(self)

    def forward(self, x):
        h = x.shape[2]
        x = F.relu(self.block0(x))
        feats, pre = [x], []
        for i, (block, pool) in enumerate(((self.block1, self.pool0), (self.block2, self.pool1),
                                           (self.block3, self.pool2), (self.block4, self.pool3))):
            if i < 3 or h == 64:
                x = pool(x)
            x = block(x)
            pre.append(x)
            x = F.relu(x)
            feats.append(x)
        x = self.pool4(x).view(x.size(0), -1)
        return self.classifier(x), feats, pre

    @staticmethod
    def _make_layers(cfg, in_channels):
        layers = []
        for v in cfg:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
        return nn.Sequential(*layers[:-1])


def ref_init_vgg_mbv2(net):  # vgg.py l. 118-131, mobilenetv2.py l. 162-175
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2. / n))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()


class RefInvertedResidual(nn.Module):  # mobilenetv2.py InvertedResidual
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, inp * expand_ratio, 1, 1, 0, bias=False), nn.BatchNorm2d(inp * expand_ratio),
            nn.ReLU(inplace=True),
            nn.Conv2d(inp * expand_ratio, inp * expand_ratio, 3, stride, 1, groups=inp * expand_ratio, bias=False),
            nn.BatchNorm2d(inp * expand_ratio), nn.ReLU(inplace=True),
            nn.Conv2d(inp * expand_ratio, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class RefMobileNetV2(nn.Module):  # mobilenetv2.py MobileNetV2; mobile_half = T 6, width 0.5
    def __init__(self, T=6, feature_dim=100, input_size=32, width_mult=0.5):
        super().__init__()
        setting = [[1, 16, 1, 1], [T, 24, 2, 1], [T, 32, 3, 2], [T, 64, 4, 2], [T, 96, 3, 1], [T, 160, 3, 2],
                   [T, 320, 1, 1]]
        input_channel = int(32 * width_mult)
        self.conv1 = nn.Sequential(nn.Conv2d(3, input_channel, 3, 2, 1, bias=False), nn.BatchNorm2d(input_channel),
                                   nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList([])
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(RefInvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(nn.Conv2d(input_channel, self.last_channel, 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(self.last_channel), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
        self.avgpool = nn.AvgPool2d(input_size // (32 // 2), ceil_mode=True)
        ref_init_vgg_mbv2(self)

    def forward(self, x):
        out = self.conv1(x)
        feats = [out]
        for i, block in enumerate(self.blocks):
            out = block(out)
            if i in (1, 2, 4, 6):
                feats.append(out)
        out = self.avgpool(self.conv2(out)).view(out.size(0), -1)
        return self.classifier(out), feats, []


class RefShuffleBlock(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        N, C, H, W = x.size()
        g = self.groups
        return x.view(N, g, C // g, H, W).permute(0, 2, 1, 3, 4).reshape(N, C, H, W)


class RefShuffleV1Bottleneck(nn.Module):  # ShuffleNetv1.py Bottleneck
    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = RefShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(preact), preact


class RefShuffleV1(nn.Module):  # ShuffleNetv1.py ShuffleNet with ShuffleV1's cfg
    def __init__(self, num_classes=100, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes, num_blocks, groups):
        layers = []
        for i in range(num_blocks):
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(RefShuffleV1Bottleneck(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        feats, pre = [out], []
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                out, p = block(out)
            feats.append(out)
            pre.append(p)
        out = F.avg_pool2d(out, 4).view(out.size(0), -1)
        return self.linear(out), feats, pre


class RefShuffleV2Basic(nn.Module):  # ShuffleNetv2.py BasicBlock, split_ratio 0.5
    def __init__(self, in_channels):
        super().__init__()
        in_channels = int(in_channels * 0.5)
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1, groups=in_channels,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.conv3 = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(in_channels)
        self.shuffle = RefShuffleBlock(2)

    def forward(self, x):
        c = int(x.size(1) * 0.5)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        preact = self.bn3(self.conv3(out))
        out = F.relu(preact)
        return self.shuffle(torch.cat([x1, out], 1)), torch.cat([x1, preact], 1)


class RefShuffleV2Down(nn.Module):  # ShuffleNetv2.py DownBlock
    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = RefShuffleBlock(2)

    def forward(self, x):
        out1 = self.bn1(self.conv1(x))
        out1 = F.relu(self.bn2(self.conv2(out1)))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = self.bn4(self.conv4(out2))
        out2 = F.relu(self.bn5(self.conv5(out2)))
        return self.shuffle(torch.cat([out1, out2], 1))


class RefShuffleV2(nn.Module):  # ShuffleNetv2.py ShuffleNetV2(net_size=1)
    def __init__(self, num_classes=100, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)  # l. 110 (the 3x3 stem is commented out)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels, num_blocks):
        layers = [RefShuffleV2Down(self.in_channels, out_channels)]
        for _ in range(num_blocks):
            layers.append(RefShuffleV2Basic(out_channels))
            self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        feats, pre = [out], []
        for layer in (self.layer1, self.layer2, self.layer3):
            out = layer[0](out)
            for block in layer[1:]:
                out, p = block(out)
            feats.append(out)
            pre.append(p)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4).view(out.size(0), -1)
        return self.linear(out), feats, pre


REFERENCE = {
    **{f"resnet{d}": (lambda d=d: RefResNet(d, [16, 16, 32, 64])) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda: RefResNet(8, [32, 64, 128, 256]),
    "resnet32x4": lambda: RefResNet(32, [32, 64, 128, 256]),
    **{f"wrn_{d}_{k}": (lambda d=d, k=k: RefWideResNet(d, k)) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    "vgg8": lambda: RefVGG(REF_VGG_CFG['S']), "vgg11": lambda: RefVGG(REF_VGG_CFG['A']),
    "vgg13": lambda: RefVGG(REF_VGG_CFG['B']), "vgg16": lambda: RefVGG(REF_VGG_CFG['D']),
    "vgg19": lambda: RefVGG(REF_VGG_CFG['E']),
    "mobilenetv2": lambda: RefMobileNetV2(),
    "shufflenetv1": lambda: RefShuffleV1(),
    "shufflenetv2": lambda: RefShuffleV2(),
}


# Exact parameter counts of RepDistiller's models as 100-class classifiers (the transcriptions
# above; by hand, e.g. resnet8: stem 432 + 32, layer1 4,672, layer2 14,528, layer3 57,728, fc
# 6,500 = 83,892). kdmtl's trunk + pooled linear head must have exactly these.
EXACT = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756,
    "resnet44": 667_188, "resnet56": 861_620, "resnet110": 1_736_564,
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "mobilenetv2": 812_836, "shufflenetv1": 949_258, "shufflenetv2": 1_355_528,
}

# Published figures (millions, 2 decimals; CRD paper, Tian et al. ICLR 2020) for orientation only:
# the exact counts above are the check. vgg8's 3,965,028 is printed there as 3.96.
PUBLISHED_M = {
    "resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_40_2": 2.26, "wrn_16_2": 0.70, "wrn_40_1": 0.57,
    "resnet56": 0.86, "resnet20": 0.28, "resnet110": 1.74, "resnet32": 0.47, "vgg13": 9.46,
    "vgg8": 3.96, "mobilenetv2": 0.81, "shufflenetv1": 0.95, "shufflenetv2": 1.36,
}

# (channels, reductions) per family at 32 px
LAYOUT = {
    "resnet": ([16, 32, 64], [1, 2, 4]),
    "resnetx4": ([64, 128, 256], [1, 2, 4]),
    "vgg": ([64, 128, 256, 512, 512], [1, 2, 4, 8, 8]),
    "mobilenetv2": ([12, 16, 48, 1280], [2, 4, 8, 16]),
    "shufflenetv1": ([240, 480, 960], [2, 4, 8]),
    "shufflenetv2": ([116, 232, 1024], [2, 4, 8]),
}


def _layout(arch):
    if arch.startswith("wrn_"):
        k = int(arch.split("_")[2])
        return [16 * k, 32 * k, 64 * k], [1, 2, 4]
    if arch.endswith("x4"):
        return LAYOUT["resnetx4"]
    for prefix in ("vgg", "resnet"):
        if arch.startswith(prefix):
            return LAYOUT[prefix]
    return LAYOUT[arch]


def _cls(num=100):
    return {"cls": Task("cls", TASK_KINDS.get("classification")(), TargetSpec("classification", num), "cls")}


def _build(arch, tasks, **overrides):
    cfg = OmegaConf.structured(ModelConfig(arch=arch, **overrides))
    torch.manual_seed(0)
    return build_model(cfg, tasks)


def _ref_features(arch, feats, pre):
    """kdmtl module path -> the RepDistiller feature it must equal (feats = [f0, f1, ...],
    pre = [f1_pre, ...]); the last stage's deliberate differences are named in the models."""
    if arch.startswith("resnet") or arch == "shufflenetv1":
        return {"trunk.stages.0": feats[1], "trunk.stages.1": feats[2], "trunk.stages.2": feats[3]}
    if arch.startswith("wrn_"):
        return {"trunk.stages.0": feats[1], "trunk.stages.1": feats[2], "trunk.stages.2.0": feats[3],
                "trunk.stages.2.1": pre[2], "trunk.stages.2": F.relu(pre[2])}
    if arch.startswith("vgg"):
        out = {f"trunk.stages.{i}": f for i, f in enumerate(feats)}
        for i, p in enumerate(pre, start=1):
            out[f"trunk.stages.{i}.block.{3 * len(VGGS[arch][i]) - 2}"] = p   # the block's last BN
        return out
    if arch == "mobilenetv2":
        return {"trunk.stages.0": feats[1], "trunk.stages.1": feats[2], "trunk.stages.2": feats[3],
                "trunk.stages.3.1": feats[4]}
    if arch == "shufflenetv2":
        return {"trunk.stages.0": feats[1], "trunk.stages.1": feats[2], "trunk.stages.2.3": feats[3]}
    raise AssertionError(arch)


# the forward comparison runs on one or two depths per family (deeper ones repeat the same
# blocks; their tensors are still compared one by one); keeps the file fast on a shared CPU
FORWARD = {"resnet8", "resnet20", "resnet8x4", "wrn_16_1", "wrn_16_2", "vgg8", "vgg13", "mobilenetv2",
           "shufflenetv1", "shufflenetv2"}


@pytest.mark.parametrize("arch", sorted(EXACT))
def test_zoo_equals_repdistiller_model(arch):
    """Same parameter count, same tensors in the same order (RepDistiller's registration order),
    and -- with kdmtl's weights and BN statistics copied into the reference -- the same logits and
    the same features at the stage paths."""
    model = _build(arch, _cls())
    ref = REFERENCE[arch]()
    n = count_parameters(model)
    assert n == EXACT[arch] == sum(p.numel() for p in ref.parameters()), (arch, n)
    assert abs(n / 1e6 - PUBLISHED_M.get(arch, n / 1e6)) < 0.0051, (arch, n)

    # random weights and BN statistics, so no BN is an identity and every tensor matters
    torch.manual_seed(1)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert [tuple(v.shape) for v in ours.values()] == [tuple(v.shape) for v in theirs.values()]
    with torch.no_grad():
        for v in ours.values():
            if v.is_floating_point():
                scale = v.std().clamp_min(0.05)
                v.copy_(torch.rand_like(v) * 0.5 + 0.75 if v.dim() <= 1 else torch.randn_like(v) * scale)
    ref.load_state_dict(dict(zip(theirs.keys(), ours.values())))
    if arch not in FORWARD:
        return
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats, pre = ref(x)
        paths = _ref_features(arch, feats, pre)
        model.capture_features(list(paths))
        out = model(x)
    assert torch.allclose(out["outputs"]["cls"], logits, rtol=1e-4, atol=1e-4), arch
    for path, f in paths.items():
        assert torch.allclose(out["features"][path], f, rtol=1e-4, atol=1e-4), (arch, path)


@pytest.mark.parametrize("arch", sorted(EXACT))
def test_zoo_layout(arch):
    model = _build(arch, _cls())
    trunk = model.trunk
    channels, reductions = _layout(arch)
    assert list(trunk.channels) == channels and list(trunk.reductions) == reductions
    last = f"trunk.stages.{len(trunk.channels) - 1}"
    modules = dict(model.named_modules())
    assert last in modules and f"trunk.stages.{len(trunk.channels)}" not in modules
    if arch not in FORWARD:   # deeper members of a family: same blocks, same layout code
        return

    model.eval()
    model.capture_features([last])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        features = trunk(x)
    assert out["outputs"]["cls"].shape == (2, 100)
    assert len(features) == len(channels)
    for f, c, r in zip(features, channels, reductions):
        assert tuple(f.shape) == (2, c, 32 // r, 32 // r), (arch, tuple(f.shape), c, r)
    # the classifier pools exactly the last stage's output
    assert torch.equal(out["features"][last], features[-1])
    assert torch.allclose(out["outputs"]["cls"], model.heads["cls"].fc(features[-1].mean((2, 3))), atol=1e-5)


# arch -> (kdmtl trunk with a chosen init, the reference init, transcribed above)
INITS = {
    "resnet8x4": (lambda init: CifarResNetTrunk(*RESNETS["resnet8x4"], init=init), ref_init_resnet),
    "resnet20": (lambda init: CifarResNetTrunk(*RESNETS["resnet20"], init=init), ref_init_resnet),
    "wrn_16_2": (lambda init: WideResNetTrunk(16, 2, init=init), ref_init_wrn),
    "vgg8": (lambda init: VGGTrunk(VGGS["vgg8"], init=init), ref_init_vgg_mbv2),
    "mobilenetv2": (lambda init: MobileNetV2Trunk(init=init), ref_init_vgg_mbv2),
}


@pytest.mark.parametrize("arch", sorted(INITS))
def test_zoo_initialisation_is_repdistillers(arch):
    """kdmtl's default init draws exactly what RepDistiller's init loop draws (same rule, same
    module order, same RNG stream): trunk at construction, then the classifier head."""
    make, ref_init = INITS[arch]
    torch.manual_seed(0)
    ours = MultiTaskModel(make("official"), _cls(), decoder_width=8)
    torch.manual_seed(0)
    trunk = make("pytorch")
    ref_init(trunk)                       # RepDistiller's loop runs after every module is built
    theirs = MultiTaskModel(trunk, _cls(), decoder_width=8)
    ref_init(theirs.heads)                # its Linear rule (wrn: bias 0; vgg / mobilenetv2: N(0, 0.01), 0)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), (arch, name)
    bns = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in bns)
    fc = ours.heads["cls"].fc
    if arch.startswith(("vgg", "mobilenet")):
        assert not fc.bias.any() and 0.008 < fc.weight.std() < 0.012
    elif arch.startswith("wrn"):
        assert not fc.bias.any()
    # and the PyTorch default is still there by name
    torch.manual_seed(0)
    assert not torch.equal(make("pytorch").state_dict()[next(iter(trunk.state_dict()))],
                           ours.trunk.state_dict()[next(iter(trunk.state_dict()))])


@pytest.mark.parametrize("arch", ["resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv2"])
def test_zoo_multitask_dense_outputs(arch):
    tasks = dict(_cls(10))
    tasks["seg"] = Task("seg", TASK_KINDS.get("segmentation")(), TargetSpec("segmentation", 5), "seg")
    tasks["depth"] = Task("depth", TASK_KINDS.get("depth")(), TargetSpec("depth", mean=5.0, std=2.0), "depth")
    model = _build(arch, tasks, decoder_width=8).train()
    out = model(torch.randn(2, 3, 32, 32))["outputs"]
    assert out["cls"].shape == (2, 10)
    assert out["seg"].shape == (2, 5, 32, 32)
    assert out["depth"].shape == (2, 1, 32, 32)
    (out["cls"].sum() + out["seg"].mean() + out["depth"].mean()).backward()
    assert all(p.grad is not None for p in model.trunk.parameters())


def test_vgg_pools_before_last_block_only_for_64px_high_inputs():
    """RepDistiller's vgg.py: `if h == 64: x = self.pool3(x)` -- 64 px only, not 'at least 64'."""
    model = _build("vgg8", _cls()).eval()
    ref = RefVGG(REF_VGG_CFG["S"]).eval()
    ref.load_state_dict(dict(zip(ref.state_dict().keys(), model.state_dict().values())))
    with torch.no_grad():
        assert [f.shape[-1] for f in model.trunk(torch.randn(1, 3, 64, 64))] == [64, 32, 16, 8, 4]
        assert [f.shape[-1] for f in model.trunk(torch.randn(1, 3, 32, 32))] == [32, 16, 8, 4, 4]
        assert [f.shape[-1] for f in model.trunk(torch.randn(1, 3, 96, 96))] == [96, 48, 24, 12, 12]
        for size in (32, 64, 96):
            x = torch.randn(1, 3, size, size)
            assert torch.allclose(model(x)["outputs"]["cls"], ref(x)[0], atol=1e-5), size
