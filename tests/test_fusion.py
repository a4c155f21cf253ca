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
from preimage.models.caffe import CaffePooling, global_average
from preimage.models.fusion import ConvReLU, border_padding, fuse_conv_relu, fuse_relu_pool, unpad_pointwise
from preimage.models.networks import Pool2d, SequentialNet, build
from preimage.representations.cnn import ModuleCut, low_precision

needs_library = pytest.mark.skipif(native.library(quiet=True) is None,
                                   reason=f"the C kernels cannot be built here: {native.failure()}")
needs_onednn = pytest.mark.skipif(not fusion._pointwise_available(), reason="this torch has no oneDNN convolution")


def _check_cut(cut: ModuleCut, x: torch.Tensor, exact: bool = True) -> ModuleCut:
    """for_optimization's copy of ``cut`` gives the same code and image gradient as ``cut`` with
    the same input-gradient hooks but no fusion (bit for bit, or to float rounding when not
    ``exact``); returns the copy."""
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
    same = torch.equal if exact else lambda u, v: torch.allclose(u, v, rtol=1e-5, atol=1e-5 * float(v.detach().abs().max()))
    assert same(code_fast, code_plain)
    g = torch.randn(code_fast.shape, generator=torch.Generator().manual_seed(1)).to(code_fast.dtype)
    code_fast.backward(g)
    code_plain.backward(g)
    assert same(a.grad, b.grad)
    return fast


def _random_caffe_net(tmp_path: Path, size: int, layers: str) -> nn.Module:
    """A CaffeNet from ``layers`` (prototxt text) on a 3 x ``size``² input, weights N(0, 0.2²) (seed 0)."""
    proto = tmp_path / "net.prototxt"
    proto.write_text(f'input: "data"\ninput_dim: 1 input_dim: 3 input_dim: {size} input_dim: {size}\n' + layers)
    torch.manual_seed(0)
    net = load_caffe(proto, None)
    for p in net.parameters():
        nn.init.normal_(p, std=0.2)
    return net


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
    net = _random_caffe_net(tmp_path, 31, 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" '
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


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("padding", [(1, 1), (2, 0), (0, 3)])
def test_padded_pointwise_conv_is_computed_unpadded(dtype: torch.dtype, channels_last: bool, relu: bool,
                                                    padding: tuple[int, int]) -> None:
    """A zero-padded 1 x 1 convolution, computed unpadded and given its border: the border is the
    (rectified) bias exactly, the rest the padded convolution's values to rounding (another
    kernel may sum in another order), and the input gradient the same (the border has none)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1, padding=padding).to(dtype).requires_grad_(False)
    assert border_padding(conv) == padding
    x = torch.randn(3, 24, 9, 11).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast = ConvReLU(conv, relu=relu)
    assert fast.fused_applies(a)
    ya, yb = fast(a), conv(b)
    yb = torch.relu(yb) if relu else yb
    assert "ConvReLU" in type(ya.grad_fn).__name__
    assert ya.is_contiguous(memory_format=torch.channels_last) == yb.is_contiguous(memory_format=torch.channels_last)
    ph, pw = padding
    inner = (slice(None), slice(None), slice(ph, ph + 9), slice(pw, pw + 11))
    border = torch.ones(ya.shape, dtype=torch.bool)
    border[inner] = False
    assert torch.equal(ya[border], yb[border])
    torch.testing.assert_close(ya[inner].float(), yb[inner].float(), rtol=0.01 if dtype == torch.bfloat16 else 1e-5,
                               atol=0.02 if dtype == torch.bfloat16 else 1e-5)
    g = torch.randn(ya.shape).to(dtype)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(a.grad, b.grad)
    with torch.no_grad():
        assert torch.equal(fast(x), ya.detach())


def test_border_padding_applies_to_padded_pointwise_convolutions_only() -> None:
    assert border_padding(nn.Conv2d(4, 4, 1)) is None
    assert border_padding(nn.Conv2d(4, 4, 3, padding=1)) is None
    assert border_padding(nn.Conv2d(4, 4, 1, stride=2, padding=1)) is None
    assert border_padding(nn.Conv2d(4, 4, 1, padding=(0, 2))) == (0, 2)


@needs_library
@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squeezenet_tail_is_unpadded(tmp_path: Path, dtype: torch.dtype) -> None:
    """SqueezeNet's conv_final (1 x 1, padding 1) -> ReLU -> global average pooling: cut after
    the pooling, the convolution runs in a ConvReLU; cut at the convolution itself, in a
    ``ConvReLU(relu=False)`` that stands for it; the same codes and gradients to rounding."""
    net = _random_caffe_net(tmp_path, 23, 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" '
                            'convolution_param { num_output: 16 kernel_size: 3 stride: 2 } }\n'
                            'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n'
                            'layer { name: "conv_final" type: "Convolution" bottom: "conv1" top: "conv_final" '
                            'convolution_param { num_output: 10 pad: 1 kernel_size: 1 } }\n'
                            'layer { name: "relu_conv_final" type: "ReLU" bottom: "conv_final" top: "conv_final" }\n'
                            'layer { name: "pool_final" type: "Pooling" bottom: "conv_final" top: "pool_final" '
                            'pooling_param { pool: AVE global_pooling: true } }\n')
    net = net.to(dtype).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 23, 23) * 40
    for layer in ("pool_final", "conv_final"):
        cut = ModuleCut(net, layer, mean=(0, 0, 0), std=(1, 1, 1), channels_last=True)
        fast = _check_cut(cut, x.to(dtype), exact=False)
        assert isinstance(fast.model.conv_final, ConvReLU) and fast.model.conv_final.relu == (layer == "pool_final")
        assert (fast._target is fast.model.conv_final) == (layer == "conv_final")
        assert type(net.conv_final) is nn.Conv2d


def test_unpad_pointwise_leaves_other_models_alone() -> None:
    assert unpad_pointwise(nn.Sequential(nn.Conv2d(3, 4, 1, padding=1))) is None
    assert unpad_pointwise(SequentialNet([("conv", nn.Conv2d(3, 4, 3, padding=1))])) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_global_average_gradient_is_broadcast(dtype: torch.dtype) -> None:
    """Global average pooling's gradient: ``mean``'s values bit for bit, as a broadcast (stride-0)
    tensor that a channels-last ReLU's backward reads fast (not an NCHW copy)."""
    x = torch.randn(3, 5, 7, 9).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(3, 5, 1, 1).to(dtype)
    seen: list[torch.Tensor] = []
    x.register_hook(lambda grad: seen.append(grad))
    y = global_average(x)
    assert torch.equal(y, x.mean((-2, -1), keepdim=True))
    y.backward(g)
    assert seen[0].stride()[-2:] == (0, 0)
    ours = x.grad.clone()
    x.grad = None
    x.mean((-2, -1), keepdim=True).backward(g)
    assert torch.equal(ours, x.grad)
    xd = torch.randn(2, 3, 4, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(global_average, (xd,))
