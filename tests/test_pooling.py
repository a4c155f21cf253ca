"""Max pooling through the C kernels (preimage.models.pooling, issue 5) and the ReLU -> max
pooling fusion of Φ's optimization copy (preimage.models.fusion): torch's values and gradients,
bit for bit, and the same codes and image gradients with and without the fusion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from preimage import native
from preimage.models import load_caffe
from preimage.models.caffe import CaffePooling
from preimage.models.fusion import fuse_relu_pool
from preimage.models.networks import Pool2d, SequentialNet
from preimage.models.pooling import max_pool2d
from preimage.representations.cnn import ModuleCut

needs_library = pytest.mark.skipif(native.library(quiet=True) is None,
                                   reason=f"the C kernels cannot be built here: {native.failure()}")

GEOMETRIES = [  # kernel, stride, pad, ceil
    ((3, 3), (2, 2), (0, 0), True), ((3, 3), (2, 2), (1, 1), False), ((2, 2), (2, 2), (0, 0), False),
    ((3, 3), (2, 2), (1, 1), True), ((5, 3), (1, 2), (2, 1), True), ((1, 1), (3, 3), (0, 0), False),
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that any NaN equals any NaN (torch's vectorized bf16 kernel
    returns another NaN pattern) and 0 equals -0 (ReLU's zero)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.contiguous(), b.contiguous()
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    return torch.equal(torch.where(nan, 0, a), torch.where(nan, 0, b)) and torch.equal(
        _bits(torch.where(nan | (a == 0), 0, a)), _bits(torch.where(nan | (b == 0), 0, b)))


@pytest.fixture(params=[1, 2, 3])
def threads(request: pytest.FixtureRequest):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _input(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).round().to(dtype)  # integers: many tied maxima
    x.view(-1)[::17] = -float("inf")
    x.view(-1)[5::97] = float("nan")
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("relu", [False, True])
def test_max_pool_is_torchs(dtype: torch.dtype, channels_last: bool, geometry, relu: bool, threads: int) -> None:
    """Values and gradients of max_pool2d (and of the ReLU fused into it) against F.max_pool2d
    (of F.relu(x)), bit for bit: tied maxima (the first wins), NaN, -inf, clipped windows,
    padding, channel counts across the 16-lane blocks (1, 16, 70), overlapping windows whose
    gradients add up (in bf16 rounded after each addition, as torch)."""
    kernel, stride, pad, ceil = geometry
    for seed, shape in enumerate([(2, 5, 13, 11), (1, 70, 9, 10), (3, 1, 8, 9), (1, 16, 7, 7)]):
        x = _input(shape, dtype, channels_last, seed)
        ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = max_pool2d(ours, kernel, stride, pad, ceil, relu=relu)
        ref = F.max_pool2d(F.relu(theirs) if relu else theirs, kernel, stride, pad, ceil_mode=ceil)
        assert _same(y, ref.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format))
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        y.backward(g)
        ref.backward(g)
        assert _same(ours.grad, theirs.grad), (shape, seed)
        with torch.no_grad():  # the forward-only path keeps no index
            assert _same(max_pool2d(x, kernel, stride, pad, ceil, relu=relu), y.detach())


@needs_library
def test_max_pool_takes_the_c_path_and_falls_back() -> None:
    """The kernel runs for dense fp32 / bf16 CPU tensors (one byte of index per output, not
    torch's eight); float64, other layouts and PREIMAGE_NATIVE=0 get F.max_pool2d itself."""
    x = torch.randn(2, 4, 9, 9)
    assert native.max_pool(x, (3, 3), (2, 2), (0, 0), (4, 4))[1].dtype == torch.uint8
    assert native.max_pool(x.double(), (3, 3), (2, 2), (0, 0), (4, 4)) is None
    assert native.max_pool(x.transpose(2, 3), (3, 3), (2, 2), (0, 0), (4, 4)) is None
    assert native.max_pool(x, (16, 16), (1, 1), (0, 0), (1, 1)) is None  # 256 window positions
    for t in (x.double(), x.transpose(2, 3)):
        torch.testing.assert_close(max_pool2d(t, (3, 3), (2, 2), (0, 0), True, relu=True),
                                   F.max_pool2d(F.relu(t), (3, 3), (2, 2), ceil_mode=True), rtol=0, atol=0)


def test_max_pool_without_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREIMAGE_NATIVE", "0")
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    y = max_pool2d(x, (3, 3), (2, 2), (1, 1), False, relu=True)
    assert y.grad_fn is not None and "MaxPool" in type(y.grad_fn).__name__ and "_MaxPool" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, F.max_pool2d(F.relu(x), 3, 2, 1), rtol=0, atol=0)


def _check_cut(cut: ModuleCut, x: torch.Tensor) -> ModuleCut:
    """for_optimization's copy of ``cut`` gives the same code and image gradient as ``cut`` with
    the same input-gradient hooks but no fusion; returns the copy."""
    fast = cut.for_optimization()
    assert fast.for_optimization() is fast
    plain = cut.for_optimization.__func__  # the copy without the fusion: patch it out
    import preimage.models.fusion as fusion

    original = fusion.fuse_relu_pool
    fusion.fuse_relu_pool = lambda model, keep: None
    try:
        cut._optimized = False
        unfused = plain(cut)
    finally:
        fusion.fuse_relu_pool = original
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
    # a cut at the pooling returns the fused pooling's output; a cut at a ReLU keeps that ReLU
    at_pool = _check_cut(ModuleCut(model, "pool2", mean=(0, 0, 0), std=(1, 1, 1), channels_last=True), x)
    assert at_pool._target is at_pool.model.pool2 and at_pool.model.pool2.relu_first
    at_relu = _check_cut(ModuleCut(model, "relu2", mean=(0, 0, 0), std=(1, 1, 1), channels_last=True), x)
    assert isinstance(at_relu.model.relu2, nn.ReLU) and isinstance(at_relu.model.relu1, nn.Identity)


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
    assert isinstance(fast.model.relu2, nn.ReLU) and not fast.model.pool2.relu_first  # "side" reads it too
    assert isinstance(fast.model.relu3, nn.ReLU)  # average pooling
    assert isinstance(net.relu1, nn.ReLU)


def test_no_fusion_for_other_models() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    assert fuse_relu_pool(model, model[2]) is None
    pool = CaffePooling("AVE", (2, 2), (2, 2), (0, 0))
    with pytest.raises(ValueError, match="max pooling"):
        pool.fused_with_relu()
