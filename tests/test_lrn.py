"""Caffe's ACROSS_CHANNELS LRN in the C kernels (:func:`preimage.native.lrn`, used by
:class:`~preimage.models.caffe.CaffeLRN` on the CPU): values and gradients against torch's
``local_response_norm`` differentiated by autograd in float64, in fp32 and bf16, NCHW and
channels-last, over shapes that exercise every edge of the kernels' blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from preimage import native
from preimage.models import caffe
from preimage.models.caffe import CaffeLRN

pytestmark = pytest.mark.skipif(native.library(quiet=True) is None, reason=f"no C kernels: {native.failure()}")

# (N, C, H, W): fewer channels than the window; channels-last pixels that run across images in
# blocks of 16 (N H W not a multiple of 16); NCHW planes shorter than, and not a multiple of, 64 lanes
SHAPES = [(1, 1, 2, 2), (1, 2, 3, 3), (2, 7, 5, 3), (3, 96, 6, 6), (1, 19, 11, 13), (2, 256, 3, 5)]


def _reference(x: torch.Tensor, g: torch.Tensor, size: int, alpha: float, beta: float, k: float):
    x64 = x.double().requires_grad_(True)
    y = F.local_response_norm(x64, size, alpha=alpha, beta=beta, k=k)
    (dx,) = torch.autograd.grad(y, x64, g.double())
    return y.detach(), dx


def _inputs(shape, channels_last: bool, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 20).relu_().add_(torch.randn(shape, generator=gen))  # ReLU'd, as in a net
    g = torch.randn(shape, generator=gen)
    x, g = x.to(dtype), g.to(dtype)
    if channels_last:
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    return x, g


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("size", "alpha", "beta", "k"), [(5, 1e-2, 0.75, 1.0), (3, 0.5, 0.75, 2.0),
                                                          (7, 5e-3, 0.5, 2.0), (1, 1e-2, 0.75, 1.0)])
def test_fp32_values_and_gradients_match_torch(shape, channels_last, size, alpha, beta, k) -> None:
    x, g = _inputs(shape, channels_last, torch.float32)
    want_y, want_dx = _reference(x, g, size, alpha, beta, k)
    y = native.lrn(x, size, alpha, beta, k)
    dx = native.lrn(x, size, alpha, beta, k, grad=g)
    assert y is not None and dx is not None
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert y.dtype == dx.dtype == torch.float32
    assert y.is_contiguous(memory_format=layout) and dx.is_contiguous(memory_format=layout)
    assert _relative(y, want_y) < 1e-6
    assert _relative(dx, want_dx) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_is_rounded_once(shape, channels_last) -> None:
    """bf16 in and out, fp32 inside: within bf16's rounding of the output (2^-8 relative) of the
    exact LRN of the bf16 input -- more accurate than the banded convolution's bf16 arithmetic."""
    x, g = _inputs(shape, channels_last, torch.bfloat16, seed=1)
    want_y, want_dx = _reference(x, g, 5, 1e-2, 0.75, 1.0)
    y = native.lrn(x, 5, 1e-2, 0.75, 1.0)
    dx = native.lrn(x, 5, 1e-2, 0.75, 1.0, grad=g)
    assert y.dtype == dx.dtype == torch.bfloat16
    assert float(((y.double() - want_y).abs() / want_y.abs().clamp_min(1e-3)).max()) <= 2.0 ** -8
    assert _relative(dx, want_dx) < 2.0 ** -7


def test_caffe_lrn_runs_the_kernels_and_falls_back_without_them(monkeypatch) -> None:
    """CaffeLRN takes the C kernels on the CPU (forward and backward), and the banded
    convolution where they are missing: the same values and gradients to fp32 rounding."""
    lrn = CaffeLRN(5, 1e-4 * 5, 0.75, 1.0)
    x, g = _inputs((2, 96, 9, 9), True, torch.float32)
    x.requires_grad_(True)
    y = lrn(x)
    assert type(y.grad_fn).__name__ == "_NativeLRNBackward"
    (dx,) = torch.autograd.grad(y, x, g)
    with torch.no_grad():
        y_no_grad = lrn(x)
    assert torch.equal(y_no_grad, y.detach())

    monkeypatch.setattr(caffe.native, "lrn_layout", lambda t: None)
    y_band = lrn(x)
    assert type(y_band.grad_fn).__name__ == "_CrossChannelLRNBackward"
    (dx_band,) = torch.autograd.grad(y_band, x, g)
    torch.testing.assert_close(y, y_band, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_band, rtol=1e-5, atol=1e-6)


def test_one_thread_or_two_give_the_same_bits() -> None:
    x, g = _inputs((3, 96, 7, 9), True, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.lrn(x, 5, 1e-2, 0.75, 1.0), native.lrn(x, 5, 1e-2, 0.75, 1.0, grad=g)
        torch.set_num_threads(2)
        two = native.lrn(x, 5, 1e-2, 0.75, 1.0), native.lrn(x, 5, 1e-2, 0.75, 1.0, grad=g)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_nan_propagates_and_other_inputs_are_declined() -> None:
    x, _ = _inputs((1, 8, 3, 3), False, torch.float32)
    x[0, 3, 1, 1] = float("nan")
    y = native.lrn(x, 5, 1e-2, 0.75, 1.0)
    assert torch.isnan(y[0, 1:6, 1, 1]).all()  # every channel whose window holds the NaN
    assert not torch.isnan(y[0, 6:, 1, 1]).any() and not torch.isnan(y[0, :, 0, 0]).any()
    assert native.lrn(x.double(), 5, 1e-2, 0.75, 1.0) is None  # float64: gradcheck's, torch's path
    assert native.lrn(x[:, :, :, :2], 5, 1e-2, 0.75, 1.0) is None  # not dense
    assert native.lrn(x[0], 5, 1e-2, 0.75, 1.0) is None  # not 4-d
