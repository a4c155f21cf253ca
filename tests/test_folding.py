"""Batch normalization folding and ReLU fusions for any module (models/folding.py), on a small
ResNet written here (torchvision is not installed): the same codes and image gradients as the
network as written, to rounding, with the original untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from preimage.models import fusion
from preimage.models.folding import FrozenLinear, NativeMaxPool2d, fold_batchnorm, fuse_module
from preimage.models.fusion import ConvReLU
from preimage.representations.cnn import ModuleCut, low_precision

pytestmark = pytest.mark.skipif(not fusion._pointwise_available(), reason="this torch has no oneDNN convolution")


class Block(nn.Module):
    """torchvision's BasicBlock: one ReLU module called twice."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (None if stride == 1 and cin == cout else
                           nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Block(8, 8, 1))
        self.layer2 = nn.Sequential(Block(8, 16, 2), Block(16, 16, 1))
        self.head = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.head(self.layer2(self.layer1(x)))


def _net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = TinyResNet().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics and affine parameters far from the identity
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.3, 3)
            nn.init.normal_(m.weight, 1, 0.3)
            nn.init.normal_(m.bias, 0, 0.3)
    return low_precision(net, dtype, channels_last=True)


def _compare(cut: ModuleCut, fast: ModuleCut, tol: float) -> None:
    x = torch.randn(2, 3, 45, 43, generator=torch.Generator().manual_seed(1)) * 40
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = cut(a), fast(b)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)).to(want.dtype)
    want.backward(g)
    got.backward(g)
    assert ((b.grad - a.grad).norm() / a.grad.norm()).item() < tol


def test_resnet_folded_and_fused() -> None:
    net = _net()
    x = torch.randn(1, 3, 45, 43)
    with torch.no_grad():
        before = net(x)
    cut = ModuleCut(net, "layer2", mean=(0, 0, 0), std=(1, 1, 1), channels_last=True, probe_size=45)
    fast = cut.for_optimization()
    f = fast.model
    # stem: conv1 + bn1 folded; its ReLU goes into the max pooling, which runs natively
    assert type(f.conv1) is nn.Conv2d and f.conv1 is not net.conv1 and isinstance(f.bn1, nn.Identity)
    assert isinstance(f.relu, nn.Identity) and isinstance(f.maxpool, NativeMaxPool2d) and f.maxpool.relu_first
    # blocks: every convolution folded; the ReLU called twice stays
    block = f.layer2[0]
    assert isinstance(block.bn1, nn.Identity) and isinstance(block.bn2, nn.Identity)
    assert isinstance(block.downsample[1], nn.Identity) and type(block.relu) is nn.ReLU
    # the head: convolution, normalization and ReLU in one call
    assert isinstance(f.head[0], ConvReLU) and isinstance(f.head[1], nn.Identity) and isinstance(f.head[2], nn.Identity)
    assert fast._target is f.layer2 and f.layer2 is not net.layer2
    _compare(cut, fast, 1e-5)
    # the network as written is untouched
    assert type(net.bn1) is nn.BatchNorm2d and type(net.relu) is nn.ReLU and type(net.maxpool) is nn.MaxPool2d
    assert type(net.layer2[0].bn1) is nn.BatchNorm2d and type(net.head[0]) is nn.Conv2d
    with torch.no_grad():
        assert torch.equal(net(x), before)


def test_resnet_in_bf16() -> None:
    """bf16: the folded weights are rounded to bf16.  Against the fp32 network, the folded bf16
    cut's code and image gradient are as accurate as the bf16 network as written."""
    reference = ModuleCut(_net(), "head", mean=(0, 0, 0), std=(1, 1, 1), channels_last=True, probe_size=45)
    cut = ModuleCut(_net(torch.bfloat16), "head", mean=(0, 0, 0), std=(1, 1, 1), channels_last=True, probe_size=45)
    fast = cut.for_optimization()
    assert isinstance(fast.model.head[0], ConvReLU) and fast.model.head[0].conv.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 45, 43, generator=torch.Generator().manual_seed(1)) * 40
    want = reference(x.clone().requires_grad_())
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    errors = []
    for rep in (reference, cut, fast):
        xr = x.clone().requires_grad_()
        code = rep(xr)
        code.backward(g.to(code.dtype))
        errors.append((code.float(), xr.grad))
    (c0, g0), (c1, g1), (c2, g2) = errors
    code_err = [((c - c0).norm() / c0.norm()).item() for c in (c1, c2)]
    grad_err = [((gr - g0).norm() / g0.norm()).item() for gr in (g1, g2)]
    assert code_err[0] < 2e-2 and code_err[1] < 1.5 * code_err[0] + 1e-3
    assert grad_err[0] < 0.3 and grad_err[1] < 1.5 * grad_err[0] + 1e-3


def test_cuts_at_the_fused_modules() -> None:
    net = _net()
    at_bn = ModuleCut(net, "head.1", mean=(0, 0, 0), std=(1, 1, 1), probe_size=45)
    fast = at_bn.for_optimization()
    # the normalization is the cut: folded, and its ReLU kept out
    assert isinstance(fast._target, nn.Identity) and fast._target is fast.model.head[1]
    assert type(fast.model.head[0]) is nn.Conv2d and type(fast.model.head[2]) is nn.ReLU
    _compare(at_bn, fast, 1e-5)
    at_conv = ModuleCut(net, "head.0", mean=(0, 0, 0), std=(1, 1, 1), probe_size=45)
    fast = at_conv.for_optimization()
    assert fast.model.head[0] is net.head[0] and type(fast.model.head[1]) is nn.BatchNorm2d  # not folded
    _compare(at_conv, fast, 1e-5)
    at_relu = ModuleCut(net, "head.2", mean=(0, 0, 0), std=(1, 1, 1), probe_size=45)
    fast = at_relu.for_optimization()
    assert isinstance(fast.model.head[0], ConvReLU) and fast._target is fast.model.head[2]
    _compare(at_relu, fast, 1e-5)


def test_what_is_not_folded() -> None:
    net = _net()
    net.head[1].train()  # batch statistics: nothing to fold
    fused = fuse_module(net, net.layer2)
    assert fused is not None and type(fused[0].head[1]) is nn.BatchNorm2d
    trainable = TinyResNet().eval()  # weights that want gradients
    fused = fuse_module(trainable, trainable.head)
    assert fused is not None and type(fused[0].bn1) is nn.BatchNorm2d and isinstance(fused[0].maxpool, NativeMaxPool2d)

    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y

    branchy = low_precision(Branchy().eval(), torch.float32, channels_last=False)
    assert fuse_module(branchy, branchy.bn) is None
    cut = ModuleCut(branchy, "bn", mean=(0, 0, 0), std=(1, 1, 1), probe_size=16)
    assert cut.for_optimization() is cut


def test_fold_batchnorm_matches() -> None:
    torch.manual_seed(3)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 9, 9)
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    with torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
        assert torch.equal(conv.weight, weight) and torch.equal(conv.bias, bias)  # conv's own are untouched
        folded = fold_batchnorm(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6, affine=False).eval())
        assert folded.bias is not None and not folded.weight.requires_grad


@pytest.mark.parametrize("ceil, pad", [(False, 0), (True, 1), (True, 0)])
def test_native_max_pool_module_is_torchs(ceil: bool, pad: int) -> None:
    pool = nn.MaxPool2d(3, 2, pad, ceil_mode=ceil)
    native = NativeMaxPool2d.of(pool)
    x = torch.randn(2, 5, 14, 15).contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = pool(a), native(b)
    assert torch.equal(ya, yb)
    g = torch.randn(ya.shape)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)


def test_linear_layers_take_the_transposed_gradient() -> None:
    """``nn.Linear`` runs as a :class:`FrozenLinear` (the cut's own too): the same code, and in
    bf16 the input gradient from the weights' transposed copy, to bf16 rounding."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 10),
                        nn.ReLU(), nn.Linear(10, 5)).eval()
    net = low_precision(net, torch.bfloat16, channels_last=True)
    cut = ModuleCut(net, "6", mean=(0, 0, 0), std=(1, 1, 1), channels_last=True, probe_size=45)
    fast = cut.for_optimization()
    assert isinstance(fast.model[4], FrozenLinear) and isinstance(fast._target, FrozenLinear)
    assert fast._target is fast.model[6] and type(net[6]) is nn.Linear and fast.model[4].weight is net[4].weight
    _compare(cut, fast, 2e-2)
    assert "_transposed_weight" in fast.model[4].__dict__ and "_transposed_weight" in fast.model[6].__dict__
