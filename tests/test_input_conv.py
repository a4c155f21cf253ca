"""The sub-pixel input gradient of image-facing strided convolutions (representations/input_conv.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from preimage.defaults import Settings
from preimage.engine import Stage, optimize
from preimage.models.networks import PaddedConv2d, build
from preimage.objectives import L2Loss
from preimage.representations import ModuleCut
from preimage.representations.cnn import low_precision
from preimage.representations.input_conv import input_gradient, qualifies


def _frozen(conv: nn.Conv2d) -> nn.Conv2d:
    for p in conv.parameters():
        p.requires_grad_(False)
    return conv


@pytest.mark.parametrize("kernel, stride, padding, size", [
    (11, 4, 0, (31, 27)),   # AlexNet conv1: 11 is not a multiple of 4
    (7, 2, 0, (21, 22)),    # VGG-M / SqueezeNet conv1; odd and even sizes
    (7, 2, 3, (17, 17)),    # ResNet's stem
    (5, 3, 2, (16, 20)),    # input rows no window reaches (zero gradient)
    ((3, 5), (2, 3), (1, 0), (15, 19)),  # non-square kernel and stride
    (3, 1, 1, (17, 16)),    # VGG conv1_1: stride 1, computed in 2 x 2 blocks
    (3, 1, 0, (15, 16)),    # stride 1, odd padded height: one more block row
    (2, 1, 0, (9, 10)),     # even kernel
    ((5, 3), 1, (2, 0), (14, 13)),
])
def test_input_gradient_is_the_convolutions_gradient(kernel, stride, padding, size) -> None:
    """gradcheck in float64: the sub-pixel formula is the transpose of the convolution."""
    torch.manual_seed(0)
    conv = _frozen(nn.Conv2d(3, 5, kernel, stride=stride, padding=padding).double())
    assert qualifies(conv)
    rep = ModuleCut(nn.Sequential(conv, nn.ReLU()), "0", mean=(0, 0, 0), std=(1, 1, 1), probe_size=32)
    fast = rep.for_optimization()
    assert fast is not rep and fast.fast_input_gradient == [conv] and rep.fast_input_gradient == []
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast, (x,), eps=1e-6, atol=1e-7)
    g = torch.randn_like(rep(x))
    (want,) = torch.autograd.grad(rep(x), x, g)
    (got,) = torch.autograd.grad(fast(x), x, g)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_matconvnet_asymmetric_padding() -> None:
    torch.manual_seed(1)
    conv = _frozen(PaddedConv2d(3, 4, 7, stride=2, pad=(1, 2, 3, 0)).double())
    assert qualifies(conv)
    x = torch.randn(1, 3, 19, 23, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(conv(x))
    (want,) = torch.autograd.grad(conv(x), x, g)
    got = input_gradient(g, conv.weight, (2, 2), (1, 3), (19, 23))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_which_convolutions_qualify() -> None:
    def conv(*args: object, **kw: object) -> nn.Conv2d:
        return _frozen(nn.Conv2d(*args, **kw))  # type: ignore[arg-type]

    assert qualifies(conv(3, 8, 7, stride=2))
    assert qualifies(conv(3, 8, 3, stride=1, padding=1))     # VGG conv1_1: blocked
    assert not qualifies(conv(3, 8, 1, stride=1))            # 1x1: a matrix product already
    assert not qualifies(conv(16, 8, 3, stride=2))           # not image-facing
    assert not qualifies(conv(4, 8, 3, stride=2, groups=2))
    assert not qualifies(conv(3, 8, 3, stride=2, dilation=2))
    assert not qualifies(conv(3, 8, 3, stride=2, padding=1, padding_mode="reflect"))
    assert not qualifies(nn.Conv2d(3, 8, 7, stride=2))       # weights that want gradients

    class Custom(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    assert not qualifies(_frozen(Custom(3, 8, 7, stride=2)))  # an unknown forward
    rep = ModuleCut(nn.Sequential(conv(3, 8, 1), nn.Tanh()), "1", mean=(0, 0, 0), probe_size=32)
    assert rep.for_optimization() is rep  # nothing to replace


def _same_code_close_gradient(rep: ModuleCut, fast: ModuleCut, x: torch.Tensor, tol: float) -> torch.Tensor:
    """``fast`` gives ``rep``'s code bit for bit and its image gradient to relative ``tol``;
    returns the code."""
    c_ref, c_fast = rep(x), fast(x)
    assert torch.equal(c_ref, c_fast)
    g = torch.randn(c_ref.shape).to(c_ref.dtype)
    (want,) = torch.autograd.grad(c_ref, x, g)
    (got,) = torch.autograd.grad(c_fast, x, g)
    assert ((got - want).norm() / want.norm()).item() < tol
    return c_ref


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_alexnet_cut_same_code_and_gradient(precision: str) -> None:
    """AlexNet conv1 -> conv2 (random weights): the code is bit-identical, the gradient agrees to
    rounding, the hooks are gone after the call, and a call without gradients is untouched."""
    torch.manual_seed(0)
    net = build("alexnet")
    model = low_precision(net) if precision == "bf16" else net
    rep = ModuleCut(model, "conv2", mean=(0, 0, 0), std=(1, 1, 1), channels_last=precision == "bf16", probe_size=99)
    fast = rep.for_optimization()
    conv1 = model.conv1
    assert fast.fast_input_gradient == [conv1] and fast.for_optimization() is fast
    x = (torch.randn(2, 3, 99, 99) * 50).requires_grad_(True)
    c_ref = _same_code_close_gradient(rep, fast, x, 1e-6 if precision == "fp32" else 1e-3)
    assert not conv1._forward_hooks and not conv1._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(fast(x), c_ref)


def test_in_place_relu_after_the_convolution_and_a_cut_at_it() -> None:
    """torchvision's AlexNet applies ``ReLU(inplace=True)`` to conv1's output; a cut at the
    convolution itself must still capture its output."""
    torch.manual_seed(0)
    model = nn.Sequential(_frozen(nn.Conv2d(3, 6, 11, stride=4, padding=2)), nn.ReLU(inplace=True),
                          _frozen(nn.Conv2d(6, 4, 3)))
    x = (torch.randn(1, 3, 63, 63) * 50).requires_grad_(True)
    for layer in ("2", "0"):
        rep = ModuleCut(model, layer, mean=(0, 0, 0), std=(1, 1, 1), probe_size=63)
        fast = rep.for_optimization()
        g = torch.randn(rep(x).shape)
        (want,) = torch.autograd.grad(rep(x), x, g)
        (got,) = torch.autograd.grad(fast(x), x, g)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_engine_trajectory_unchanged() -> None:
    """20 iterations on AlexNet conv1 (fp32): the engine, which differentiates
    ``for_optimization()``, follows the native convolution's trajectory."""
    torch.manual_seed(0)
    rep = ModuleCut(build("alexnet"), "relu1", mean=(0, 0, 0), std=(1, 1, 1), probe_size=67)

    class Native(nn.Module):  # the same Φ, without the sub-pixel backward
        def __init__(self) -> None:
            super().__init__()
            self.rep = rep
            self.in_channels, self.geometry = rep.in_channels, rep.geometry

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rep(x)

    with torch.no_grad():
        target = rep(torch.randn(2, 3, 67, 67) * 40)
    settings = Settings(iterations=20, fine_iterations=0)
    fast = optimize(rep, L2Loss(target), (67, 67), [0, 1], settings, [Stage(20)], compile=False)
    native = optimize(Native(), L2Loss(target), (67, 67), [0, 1], settings, [Stage(20)], compile=False)  # type: ignore[arg-type]
    torch.testing.assert_close(fast.energy["total"], native.energy["total"], rtol=1e-3, atol=1e-5)
    assert ((fast.x - native.x).norm() / native.x.norm()).item() < 1e-3


def test_subpixel_kernel_keeps_weights_untouched() -> None:
    conv = _frozen(nn.Conv2d(3, 4, 5, stride=2))
    before = conv.weight.clone()
    g = torch.randn(1, 4, 6, 6)
    input_gradient(g, conv.weight, (2, 2), (0, 0), (15, 15))
    assert torch.equal(conv.weight, before)
    ref = F.conv_transpose2d(g, conv.weight, stride=2)
    torch.testing.assert_close(input_gradient(g, conv.weight, (2, 2), (0, 0), (15, 15)), ref, rtol=1e-5, atol=1e-5)


def test_kernel_follows_weight_changes() -> None:
    """The sub-pixel kernel is cached per weight tensor and rebuilt when the weights change in place."""
    conv = _frozen(nn.Conv2d(3, 4, 5, stride=2))
    g = torch.randn(1, 4, 6, 6)
    first = input_gradient(g, conv.weight, (2, 2), (0, 0), (15, 15))
    with torch.no_grad():
        conv.weight.mul_(2)
    torch.testing.assert_close(input_gradient(g, conv.weight, (2, 2), (0, 0), (15, 15)), 2 * first)
    torch.testing.assert_close(input_gradient(g, conv.weight, (2, 2), (0, 0), (15, 15)),
                               F.conv_transpose2d(g, conv.weight, stride=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, stride, padding, size", [
    (11, 4, 0, (31, 27)), (7, 2, 3, (17, 17)), (5, 3, 2, (16, 20)), ((3, 5), (2, 3), (1, 0), (15, 19)),
])
def test_padded_input_gradient_is_the_convolutions_gradient(kernel, stride, padding, size) -> None:
    """The CUDA form for bf16 (the image padded to 8 channels), checked in float64 on the CPU."""
    from preimage.representations.input_conv import padded_input_gradient

    torch.manual_seed(2)
    conv = _frozen(nn.Conv2d(3, 5, kernel, stride=stride, padding=padding).double())
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(conv(x))
    (want,) = torch.autograd.grad(conv(x), x, g)
    pad = conv.padding
    got = padded_input_gradient(g, conv.weight, conv.stride, (pad[0], pad[1]), size)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got = padded_input_gradient(g, conv.weight, conv.stride, (pad[0], pad[1]), size)  # cached weight
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_the_method_follows_device_precision_and_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU: sub-pixel.  A device listed in ALIGNED_DEVICES (CUDA): sub-pixel when its C_in*s*s
    channels are a multiple of 8, else the padded form for bf16 only; here the CPU stands in
    for CUDA, and the hooks' gradient must be autograd's."""
    from preimage.representations import input_conv

    stride2 = _frozen(nn.Conv2d(3, 8, 7, stride=2))  # 12 sub-pixel channels
    stride4 = _frozen(nn.Conv2d(3, 8, 11, stride=4))  # 48
    stride1 = _frozen(nn.Conv2d(3, 8, 3, padding=1))
    x = torch.randn(2, 3, 29, 29, requires_grad=True)
    assert input_conv.method(stride2, x) == "subpixel" and input_conv.method(stride4, x) == "subpixel"
    assert input_conv.method(stride1, x) == "subpixel"
    monkeypatch.setattr(input_conv, "DEVICES", set())
    monkeypatch.setattr(input_conv, "ALIGNED_DEVICES", {"cpu"})
    assert input_conv.method(low_precision(stride1, torch.bfloat16), x) is None  # blocked: CPU only
    assert input_conv.method(stride2, x) is None  # fp32, 12 channels: autograd's own
    assert input_conv.method(stride4, x) == "subpixel"
    fast = low_precision(stride2, torch.bfloat16, channels_last=True)
    assert input_conv.method(fast, x) == "padded"
    assert input_conv.method(low_precision(stride4, torch.bfloat16), x) == "subpixel"
    xb = x.detach().to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn_like(fast(xb))
    (want,) = torch.autograd.grad(fast(xb), xb, g)
    with input_conv.InputGradientHooks([fast]):
        out = fast(xb)
    assert "InputGradient" in type(out.grad_fn).__name__
    (got,) = torch.autograd.grad(out, xb, g)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vgg_conv1_1_cut_same_code_and_gradient(precision: str) -> None:
    """VGG-VD-16 conv1_1 -> relu1_2 (random weights, channels-last as the engine runs it): the
    stride-1 blocked gradient agrees with autograd's to rounding, in both channel orders."""
    torch.manual_seed(0)
    net = build("vgg-vd-16")
    model = low_precision(net) if precision == "bf16" else net
    for channels_last in (True, False):
        rep = ModuleCut(model, "relu1_2", mean=(0, 0, 0), std=(1, 1, 1), channels_last=channels_last,
                        probe_size=37)
        fast = rep.for_optimization()
        assert fast.fast_input_gradient == [model.conv1_1]
        x = (torch.randn(2, 3, 37, 36) * 50).requires_grad_(True)
        _same_code_close_gradient(rep, fast, x, 1e-6 if precision == "fp32" else 1e-3)
