"""ResNet-18 in torchvision's module layout (random weights, batch normalization with random
statistics), for timing what :mod:`preimage.models.folding` does to a network given as
``--module``, and as an example of one:

    .venv/bin/preimage invert photo.jpg --module benchmarks/resnet18.py:resnet18 --layer layer3
    .venv/bin/python benchmarks/resnet18.py --layer layer3 --batch 16   # Φ as written vs folded

The timing is the bare forward + backward to the image of the cut (bf16 channels-last by
default), median of ``--iters`` steps, first as written (``ModuleCut``), then as the engine
runs it (``ModuleCut.for_optimization``: batch normalization folded, ReLUs fused, max pooling in
C), and the relative difference of the codes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [64, 128, 256, 512]
        cin = 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(seed: int = 0) -> ResNet18:
    """A ResNet-18 in evaluation mode, with He-initialized weights and batch-normalization
    statistics away from the identity (so that folding them is not trivial)."""
    torch.manual_seed(seed)
    net = ResNet18().eval()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight, 1.0, 0.1)
            nn.init.normal_(m.bias, 0.0, 0.1)
    return net


def main() -> None:
    from preimage.allocator import keep_freed_memory
    from preimage.representations.cnn import ModuleCut, low_precision

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", default="layer3")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--iters", type=int, default=7)
    opts = ap.parse_args()
    keep_freed_memory()
    dtype = torch.bfloat16 if opts.precision == "bf16" else torch.float32
    model = low_precision(resnet18(), dtype, channels_last=True)
    cut = ModuleCut(model, opts.layer, channels_last=True)
    x = torch.randn(opts.batch, 3, opts.size, opts.size, generator=torch.Generator().manual_seed(0)) * 40
    codes = []
    for name, rep in (("as written", cut), ("folded", cut.for_optimization())):
        xr = x.clone().requires_grad_()
        steps = []
        for i in range(opts.iters + 2):
            start = time.perf_counter()
            xr.grad = None
            code = rep(xr)
            code.backward(torch.ones_like(code))
            if i >= 2:
                steps.append(time.perf_counter() - start)
        codes.append(code.detach().float())
        ms = statistics.median(steps) / opts.batch * 1e3
        print(f"{name:>10}: {ms:.2f} ms per image (forward + backward, {opts.precision}, batch {opts.batch})")
    print(f"code difference: {((codes[1] - codes[0]).norm() / codes[0].norm()).item():.2e} (relative)")


if __name__ == "__main__":
    main()
