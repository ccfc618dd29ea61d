"""A PyTorch SqueezeNet with torchvision's exact module names and structure.

torchvision cannot be installed beside the available torch, so the tests carry this reference.
It mirrors torchvision/models/squeezenet.py (ceil-mode pooling, final ReLU + average pool).
"""

from __future__ import annotations

import torch
from torch import nn


class Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1
        )


class SqueezeNet(nn.Module):
    def __init__(self, version: str = "1_1", num_classes: int = 1000) -> None:
        super().__init__()
        pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)  # noqa: E731
        if version == "1_0":
            self.features = nn.Sequential(
                nn.Conv2d(3, 96, kernel_size=7, stride=2), nn.ReLU(inplace=True), pool(),
                Fire(96, 16, 64, 64), Fire(128, 16, 64, 64), Fire(128, 32, 128, 128), pool(),
                Fire(256, 32, 128, 128), Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
                Fire(384, 64, 256, 256), pool(), Fire(512, 64, 256, 256),
            )
        else:
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True), pool(),
                Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
                Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
                Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
            )
        final_conv = nn.Conv2d(512, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5), final_conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1))
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                # random biases (torchvision starts at 0) so the bias mapping is exercised too
                nn.init.uniform_(m.bias, -0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


# --- pytorch-cifar100's SqueezeNet (models/squeezenet.py): batch-norm Fire modules, bypasses, no ReLU on conv10.
# Written from the network's description, with the module names its state_dicts carry.


def _conv_bn_relu(cin: int, cout: int, kernel: int, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CifarFire(nn.Module):
    def __init__(self, cin: int, cout: int, squeeze: int) -> None:
        super().__init__()
        self.squeeze = _conv_bn_relu(cin, squeeze, 1)
        self.expand_1x1 = _conv_bn_relu(squeeze, cout // 2, 1)
        self.expand_3x3 = _conv_bn_relu(squeeze, cout // 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand_1x1(x), self.expand_3x3(x)], 1)


class CifarSqueezeNet(nn.Module):
    def __init__(self, class_num: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(2, 2))
        self.fire2 = CifarFire(96, 128, 16)
        self.fire3 = CifarFire(128, 128, 16)
        self.fire4 = CifarFire(128, 256, 32)
        self.fire5 = CifarFire(256, 256, 32)
        self.fire6 = CifarFire(256, 384, 48)
        self.fire7 = CifarFire(384, 384, 48)
        self.fire8 = CifarFire(384, 512, 64)
        self.fire9 = CifarFire(512, 512, 64)
        self.conv10 = nn.Conv2d(512, class_num, 1)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.maxpool = nn.MaxPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        f2 = self.fire2(x)
        f3 = self.fire3(f2) + f2
        f4 = self.maxpool(self.fire4(f3))
        f5 = self.fire5(f4) + f4
        f6 = self.fire6(f5)
        f7 = self.fire7(f6) + f6
        f8 = self.maxpool(self.fire8(f7))
        f9 = self.fire9(f8)
        return self.avg(self.conv10(f9)).flatten(1)


def randomize_batch_norm(model: nn.Module, seed: int = 0, inputs: torch.Tensor | None = None) -> nn.Module:
    """Give every BatchNorm2d non-trivial statistics and affine parameters, as after training.

    With ``inputs`` (normalised images, NCHW) the running statistics are those of the activations
    these images cause (so the network's output depends on its input, as a trained one's does);
    without, they are random.
    """
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2.0 + 0.1)
        if inputs is not None:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the batches below
            model.train()
            for start in range(0, len(inputs), 16):
                model(inputs[start:start + 16])
            for m in norms:
                m.momentum = 0.1
        for m in norms:
            m.num_batches_tracked.fill_(1234)
    return model.eval()
