"""Max pooling through the C kernels (preimage.models.pooling, issue 5) and the ReLU -> max
pooling fusion of Φ's optimization copy (preimage.models.fusion): torch's values and gradients,
bit for bit, and the same codes and image gradients with and without the fusion."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from preimage import native
from preimage.models.pooling import max_pool2d

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
