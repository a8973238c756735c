"""Backbones by name: the pooled output of the last stage, no classifier.

Parameter names follow the definition each network comes from, so that released weights load
with strict=True once their classifier keys are dropped: torchvision's (resnets: conv1, bn1,
layer1..4; mobilenet: features.*) and, for efficientnet_b0, lukemelas' efficientnet_pytorch
(_conv_stem, _bn0, _blocks.*, _conv_head, _bn1), the package the BINGO release vendored.
"""
import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import Bottleneck

SWAV_WIDTHS = {'resnet50w2': 2, 'resnet50w4': 4, 'resnet50w5': 5}
ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', *SWAV_WIDTHS,
         'efficientnet_b0', 'mobilenet_v3_large')

# Keys of the classifiers (torchvision's fc / classifier, efficientnet_pytorch's _fc); a plain
# state dict of either library loads once these are dropped.
CLASSIFIER_PREFIXES = ('fc.', 'classifier.', '_fc.')


class SwAVWideResNet(nn.Module):
    """SwAV's ResNet-50w{2,4,5}: every stage of ResNet-50 widened by `widen`.

    Unlike torchvision's wide_resnet50_2 (which widens only the bottleneck's inner 3x3),
    the stem, the inner widths and the block outputs are all multiplied, so the output is
    2048 * widen. The stem pads by 1 and then convolves with padding 2, as SwAV does.
    """

    def __init__(self, widen, blocks_per_stage=(3, 4, 6, 3)):
        super().__init__()
        width = 64 * widen
        self.padding = nn.ConstantPad2d(1, 0.0)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = width
        self.layer1 = self._make_layer(width, blocks_per_stage[0], stride=1)
        self.layer2 = self._make_layer(width * 2, blocks_per_stage[1], stride=2)
        self.layer3 = self._make_layer(width * 4, blocks_per_stage[2], stride=2)
        self.layer4 = self._make_layer(width * 8, blocks_per_stage[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = width * 8 * Bottleneck.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes, blocks, stride):
        # planes = the bottleneck's inner width; each block outputs planes * 4 channels.
        out_channels = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_channels
        layers += [Bottleneck(out_channels, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):  # (B, 3, H, W) -> (B, 2048 * widen)
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _torchvision_backbone(arch):
    """torchvision's definition with its classifier replaced by nn.Identity (no parameters)."""
    model = getattr(torchvision.models, arch)(weights=None)
    if arch.startswith('resnet'):
        feature_dim = model.fc.in_features
        model.fc = nn.Identity()
    else:
        # mobilenet: the classifier's first Linear reads the pooled features.
        feature_dim = next(m for m in model.classifier if isinstance(m, nn.Linear)).in_features
        model.classifier = nn.Identity()
    model.feature_dim = feature_dim
    return model


def _released_efficientnet_b0():
    """EfficientNet-B0 as the BINGO release built its student: efficientnet_pytorch's
    EfficientNet.from_name('efficientnet-b0') (BatchNorm momentum 0.01 and eps 1e-3, TensorFlow
    "SAME" padding computed for 224 px, stochastic depth 0.2, PyTorch's default initialisation).

    The release swapped the classifier `fc` for the projection head, so the pooled 1280-d feature
    still passes the package's Dropout(0.2) before the head; here the classifier `_fc` becomes
    nn.Identity, so forward = pool -> flatten -> Dropout(0.2), active in train mode only.
    """
    try:  # only this network needs the package: the others run without it
        from efficientnet_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError('efficientnet_b0 is the release\'s efficientnet_pytorch network: '
                          'pip install efficientnet-pytorch==0.7.1 (requirements.txt)') from e
    model = EfficientNet.from_name('efficientnet-b0')
    model._fc = nn.Identity()
    model.feature_dim = model._bn1.num_features
    return model


def build_backbone(arch):
    """Randomly initialised backbone `arch`; forward gives (B, feature_dim) pooled features."""
    if arch in SWAV_WIDTHS:
        return SwAVWideResNet(SWAV_WIDTHS[arch])
    if arch == 'efficientnet_b0':
        return _released_efficientnet_b0()
    if arch in ARCHS:
        return _torchvision_backbone(arch)
    raise ValueError(f"unknown arch '{arch}'; choose one of {', '.join(ARCHS)}")
