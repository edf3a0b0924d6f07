"""The FID Inception network in plain torch (no torchvision), for local weights.

FID is only comparable across papers when it uses the original TensorFlow
Inception graph (2015-12-05). pytorch-fid ported it as `pt_inception-2015-12-05-
6726825d.pth`: torchvision's Inception-v3 layout (1008 classes, no auxiliary
head) with four blocks changed to match TensorFlow:

  * the average pools in the 35x35, 17x17 and first 8x8 blocks do not count
    the zero padding (`count_include_pad=False`);
  * the last 8x8 block pools with max instead of average.

This module rebuilds that network with the same parameter names, so the file
loads as it is. Features are the 2048-d pool3 activations. Preprocessing follows
pytorch-fid: RGB in [0, 1] -> bilinear resize to 299x299 (`F.interpolate`,
`align_corners=False`, no antialiasing) -> scale to [-1, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .weights import WeightsNotFound, load_state_dict_file

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
INCEPTION_DESCRIPTION = (
    "FID Inception-v3 (pt_inception-2015-12-05, pytorch-fid port of the TF graph), pool3 2048-d; "
    "RGB [0,1] -> bilinear resize to 299x299 (torch F.interpolate, align_corners=False, no antialias) -> [-1,1]"
)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, as TF) -> ReLU"""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # TF's average pool ignores the padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class Block35(nn.Module):  # "InceptionA", 35x35
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class Reduction35(nn.Module):  # "InceptionB", 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class Block17(nn.Module):  # "InceptionC", 17x17 with factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = BasicConv2d(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, row[0], padding=row[1])
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class Reduction17(nn.Module):  # "InceptionD", 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class Block8(nn.Module):  # "InceptionE", 8x8 with split 1x3 / 3x1 branches
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1),
                self.branch_pool(pooled),
            ],
            1,
        )


class FidInceptionV3(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> pool3 features [B, 2048]."""

    feature_dim = 2048
    description = INCEPTION_DESCRIPTION

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = Block35(192, 32)
        self.Mixed_5c = Block35(256, 64)
        self.Mixed_5d = Block35(288, 64)
        self.Mixed_6a = Reduction35(288)
        self.Mixed_6b = Block17(768, 128)
        self.Mixed_6c = Block17(768, 160)
        self.Mixed_6d = Block17(768, 160)
        self.Mixed_6e = Block17(768, 192)
        self.Mixed_7a = Reduction17(768)
        self.Mixed_7b = Block8(1280, max_pool=False)
        self.Mixed_7c = Block8(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the file's classifier; not used for FID
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: batch norm always uses its running statistics
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def load_fid_inception(path: str | os.PathLike) -> FidInceptionV3:
    """The FID Inception from its local weights file (never downloaded)."""
    path = Path(os.path.expanduser(str(path)))
    get = f"download it once from {INCEPTION_URL} (the file pytorch-fid and torchmetrics use)"
    state = load_state_dict_file(path, what="the FID Inception weights", get=get)
    net = FidInceptionV3()
    expected = net.state_dict()
    unknown = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    if missing or unknown:
        raise WeightsNotFound(
            f"{path} is not the FID Inception weights file ({len(missing)} expected keys missing, e.g. "
            f"{missing[:3]}; {len(unknown)} unknown keys, e.g. {unknown[:3]}); {get}"
        )
    bad = [k for k in state if state[k].shape != expected[k].shape]
    if bad:
        raise WeightsNotFound(f"{path}: tensor shapes differ from the FID Inception for {bad[:3]}; {get}")
    net.load_state_dict(state, strict=False)
    return net
