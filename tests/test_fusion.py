"""ReLUs fused into max pooling and into convolutions in Φ's optimization copy (models/fusion.py):
the same codes and image gradients as the unfused network, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import preimage.models.fusion as fusion
from preimage import native
from preimage.models import load_caffe
from preimage.models.caffe import CaffePooling
from preimage.models.fusion import ConvReLU, fuse_conv_relu, fuse_relu_pool
from preimage.models.networks import Pool2d, SequentialNet, build
from preimage.representations.cnn import ModuleCut, low_precision

needs_library = pytest.mark.skipif(native.library(quiet=True) is None,
                                   reason=f"the C kernels cannot be built here: {native.failure()}")
needs_onednn = pytest.mark.skipif(not fusion._pointwise_available(), reason="this torch has no oneDNN convolution")


def _check_cut(cut: ModuleCut, x: torch.Tensor) -> ModuleCut:
    """for_optimization's copy of ``cut`` gives the same code and image gradient as ``cut`` with
    the same input-gradient hooks but no fusion; returns the copy."""
    fast = cut.for_optimization()
    assert fast.for_optimization() is fast
    plain = cut.for_optimization.__func__  # the copy without the fusion: patch it out
    original = fusion.fuse
    fusion.fuse = lambda model, keep: None
    try:
        cut._optimized = False
        unfused = plain(cut)
    finally:
        fusion.fuse = original
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    code_fast, code_plain = fast(a), unfused(b)
    assert torch.equal(code_fast, code_plain)
    g = torch.randn(code_fast.shape, generator=torch.Generator().manual_seed(1)).to(code_fast.dtype)
    code_fast.backward(g)
    code_plain.backward(g)
    assert torch.equal(a.grad, b.grad)
    return fast


def _sequential() -> SequentialNet:
    torch.manual_seed(0)
    return SequentialNet([("conv1", nn.Conv2d(3, 8, 3)), ("relu1", nn.ReLU()), ("pool1", Pool2d(3, 2)),
                          ("conv2", nn.Conv2d(8, 16, 3, padding=1)), ("relu2", nn.ReLU()),
                          ("pool2", Pool2d(2, 2, ceil_mode=False)), ("conv3", nn.Conv2d(16, 4, 1))])


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fusion_of_a_sequential_network(dtype: torch.dtype) -> None:
    model = _sequential().to(dtype).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 29, 29) * 40
    cut = ModuleCut(model, "conv3", mean=(0, 0, 0), std=(1, 1, 1), channels_last=True)
    fast = _check_cut(cut, x)
    assert isinstance(fast.model.relu1, nn.Identity) and fast.model.pool1.relu_first
    assert isinstance(fast.model.relu2, nn.Identity) and fast.model.pool2.relu_first
    assert isinstance(cut.model.relu1, nn.ReLU) and not cut.model.pool1.relu_first  # the original is untouched
    assert fast.model.conv1 is cut.model.conv1  # the other modules are shared
    assert type(fast.model.conv2) is nn.Conv2d  # its ReLU went into the pooling
    # a cut at the pooling returns the fused pooling's output; a cut at a ReLU keeps it out of
    # the pooling, and it goes into the convolution instead
    at_pool = _check_cut(ModuleCut(model, "pool2", mean=(0, 0, 0), std=(1, 1, 1), channels_last=True), x)
    assert at_pool._target is at_pool.model.pool2 and at_pool.model.pool2.relu_first
    at_relu = _check_cut(ModuleCut(model, "relu2", mean=(0, 0, 0), std=(1, 1, 1), channels_last=True), x)
    assert not at_relu.model.pool2.relu_first and isinstance(at_relu.model.relu1, nn.Identity)
    assert isinstance(at_relu.model.conv2, ConvReLU) and at_relu._target is at_relu.model.relu2
    assert isinstance(at_relu.model.relu2, nn.Identity)


@needs_library
def test_fusion_of_a_caffe_network(tmp_path: Path) -> None:
    """In-place ReLUs as Caffe writes them: fused where the pooling is the blob's only reader,
    left alone where another layer reads the ReLU's output too, or the pooling averages."""
    proto = tmp_path / "net.prototxt"
    proto.write_text('input: "data"\ninput_dim: 1 input_dim: 3 input_dim: 31 input_dim: 31\n'
                     'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" '
                     'convolution_param { num_output: 8 kernel_size: 3 } }\n'
                     'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n'
                     'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" '
                     'pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
                     'layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" '
                     'convolution_param { num_output: 8 kernel_size: 3 } }\n'
                     'layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }\n'
                     'layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" '
                     'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
                     'layer { name: "side" type: "Pooling" bottom: "conv2" top: "side" '
                     'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
                     'layer { name: "sum" type: "Eltwise" bottom: "pool2" bottom: "side" top: "sum" }\n'
                     'layer { name: "conv3" type: "Convolution" bottom: "sum" top: "conv3" '
                     'convolution_param { num_output: 4 kernel_size: 1 } }\n'
                     'layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }\n'
                     'layer { name: "pool3" type: "Pooling" bottom: "conv3" top: "pool3" '
                     'pooling_param { pool: AVE kernel_size: 2 stride: 2 } }\n')
    torch.manual_seed(0)
    net = load_caffe(proto, None)
    for p in net.parameters():
        nn.init.normal_(p, std=0.2)
    cut = ModuleCut(net, "pool3", mean=(0, 0, 0), std=(1, 1, 1))
    fast = _check_cut(cut, torch.randn(2, 3, 31, 31) * 40)
    assert isinstance(fast.model.relu1, nn.Identity) and fast.model.pool1.relu_first
    assert not fast.model.pool2.relu_first  # "side" reads relu2's output too: into conv2 instead
    assert isinstance(fast.model.conv2, ConvReLU) and isinstance(fast.model.relu2, nn.Identity)
    assert isinstance(fast.model.conv3, ConvReLU)  # average pooling: relu3 goes into conv3
    assert isinstance(net.relu1, nn.ReLU) and type(net.conv2) is nn.Conv2d


def test_no_fusion_for_other_models() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    assert fuse_relu_pool(model, model[2]) is None
    pool = CaffePooling("AVE", (2, 2), (2, 2), (0, 0))
    with pytest.raises(ValueError, match="max pooling"):
        pool.fused_with_relu()


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_relu_is_bit_identical(dtype: torch.dtype, channels_last: bool) -> None:
    """Forward and input gradient of ConvReLU against conv then ReLU: strides, padding, groups,
    1x1, and an image-facing convolution (whose gradient is input_conv's in both)."""
    torch.manual_seed(0)
    for ci, co, k, s, p, g, size in [(8, 16, 3, 1, 1, 1, 19), (8, 12, 5, 2, 2, 2, 23), (16, 8, 1, 1, 0, 1, 9),
                                     (3, 8, 11, 4, 0, 1, 39), (3, 8, 3, 1, 1, 1, 17)]:
        conv = nn.Conv2d(ci, co, k, stride=s, padding=p, groups=g)
        conv = low_precision(conv, dtype, channels_last)
        x = (torch.randn(2, ci, size, size) * 3).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fused = ConvReLU(conv)
        assert fused.fused_applies(x)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fused(a), torch.relu(conv(b))
        assert torch.equal(ya, yb) and ya.stride() == yb.stride()
        assert "ConvReLU" in type(ya.grad_fn).__name__
        gy = torch.randn(ya.shape).to(dtype)
        ya.backward(gy)
        yb.backward(gy)
        if ci > 4:  # image-facing convolutions: input_conv's gradient, checked below against autograd's
            assert torch.equal(a.grad, b.grad)
        else:
            torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                       atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
        with torch.no_grad():
            assert torch.equal(fused(x), torch.relu(conv(x)))


@needs_onednn
def test_conv_relu_falls_back() -> None:
    """Weights that want gradients, float64, or a dtype mismatch: the two modules' own forward."""
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    fused = ConvReLU(conv)
    assert not fused.fused_applies(x)  # conv's weights want gradients
    y = fused(x)
    assert "Relu" in type(y.grad_fn).__name__
    y.sum().backward()
    assert conv.weight.grad is not None
    conv.requires_grad_(False)
    assert fused.fused_applies(x) and not fused.fused_applies(x.double()) and not fused.fused_applies(x.bfloat16())
    torch.testing.assert_close(ConvReLU(conv.double())(x.double()), torch.relu(conv(x.double())))


@needs_onednn
@pytest.mark.parametrize("network, layer", [("alexnet", "relu3"), ("vgg-vd-16", "conv2_1"), ("vgg-vd-16", "relu2_1")])
def test_conv_relu_in_the_paper_networks(network: str, layer: str) -> None:
    """AlexNet (grouped convolutions, LRN after relu1 / relu2), VGG-VD-16 (conv1_1 image-facing
    and blocked, relu1_2 / relu2_2 into the pooling): codes and image gradients bit-identical to
    the unfused cut in bf16, channels-last, as the engine runs them."""
    torch.manual_seed(0)
    model = low_precision(build(network))
    cut = ModuleCut(model, layer, mean=(0, 0, 0), std=(1, 1, 1), channels_last=True, probe_size=67)
    fast = _check_cut(cut, torch.randn(2, 3, 67, 67) * 40)
    convs = {n for n, m in fast.model.named_children() if isinstance(m, ConvReLU)}  # (also past the cut)
    if network == "alexnet":
        assert {"conv1", "conv2", "conv3"} <= convs and fast._target is fast.model.relu3
    elif layer == "conv2_1":
        assert "conv1_1" in convs and "conv1_2" not in convs  # relu1_2 went into pool1
        assert type(fast.model.conv2_1) is nn.Conv2d  # the cut stays
    else:
        assert {"conv1_1", "conv2_1"} <= convs and fast._target is fast.model.relu2_1


def test_no_conv_fusion_for_other_models() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert fuse_conv_relu(model, model[1]) is None
