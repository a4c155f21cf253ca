"""Dense SIFT (paper section 4.1) against VLFeat 0.9.21's ``vl_dsift`` through cyvlfeat.

The reference is cyvlfeat's ``dsift(image, step, size, fast, float_descriptors=True)`` on
float32 gray images in 0..255: the same frames (``(y, x)`` centres) and descriptors
``min(512 d, 255)`` to within 1e-4.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from preimage.representations.base import Geometry, RepresentationError
from preimage import native
from preimage.representations.dsift import (
    _CLAMP_F,
    _EPS_F,
    _SQRT_TINY_F,
    DSIFT,
    _normalize,
    _normalize_backward,
    _sum_squares,
    dsift,
    dsift_frames,
)

IMAGENET = Path(__file__).parents[2] / "shared" / "images" / "imagenet-sample"
TOL = 1e-4  # on the 0..255 descriptor scale


def vlfeat_dsift(image: np.ndarray, bin_size: int, step: int, fast: bool, **kw):
    """cyvlfeat's dsift (VLFeat 0.9.21), skipping the test when cyvlfeat is missing."""
    try:
        from cyvlfeat.sift import dsift as cy_dsift
    except ImportError as e:  # pragma: no cover - depends on the environment
        pytest.skip(f"cyvlfeat is not importable ({e}); cannot compare with VLFeat")
    image = np.ascontiguousarray(image, dtype=np.float32)
    return cy_dsift(image, step=step, size=bin_size, fast=fast, float_descriptors=True, **kw)


@lru_cache(maxsize=None)
def gray_photo(name: str) -> np.ndarray:
    """A scikit-image bundled photo as float32 gray levels in 0..255."""
    from skimage import color, data

    a = getattr(data, name)()
    if a.ndim == 3:
        a = color.rgb2gray(a) * 255.0
    return a.astype(np.float32)


def crop(a: np.ndarray, h: int, w: int) -> np.ndarray:
    top, left = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
    return np.ascontiguousarray(a[top : top + h, left : left + w])


def ours(image: np.ndarray, bin_size: int, step: int, fast: bool, **kw) -> np.ndarray:
    x = torch.from_numpy(image)[None, None]
    return dsift(x, bin_size, step, fast, **kw)[0].numpy()


def check_against_vlfeat(image: np.ndarray, bin_size: int, step: int, fast: bool, **kw) -> float:
    frames, descrs = vlfeat_dsift(image, bin_size, step, fast, **kw)
    bounds = kw.get("bounds")
    window = kw.get("window_size")
    got = ours(image, bin_size, step, fast, bounds=bounds, window_size=window)
    assert got.shape == descrs.shape
    np.testing.assert_array_equal(dsift_frames(*image.shape, bin_size, step, bounds), frames)
    err = float(np.abs(got - descrs).max()) if descrs.size else 0.0
    assert err <= TOL, f"max |ours - VLFeat| = {err:.3g} > {TOL}"
    return err


# --------------------------------------------------------------------------------------
# equality with VLFeat
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True], ids=["gauss", "flat"])
@pytest.mark.parametrize("bin_size,step", [(8, 4), (8, 8), (4, 4), (4, 8)])
@pytest.mark.parametrize(
    "size", [(160, 160), (97, 131), (227, 227)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_matches_vlfeat_on_photos(size, bin_size, step, fast):
    images = [crop(gray_photo(name), *size) for name in ("camera", "astronaut", "coffee")]
    got = dsift(torch.from_numpy(np.stack(images))[:, None], bin_size, step, fast).numpy()
    for image, mine in zip(images, got):
        frames, descrs = vlfeat_dsift(image, bin_size, step, fast)
        np.testing.assert_array_equal(dsift_frames(*size, bin_size, step), frames)
        assert mine.shape == descrs.shape
        err = float(np.abs(mine - descrs).max())
        assert err <= TOL, f"max |ours - VLFeat| = {err:.3g} > {TOL}"


@pytest.mark.parametrize("fast", [False, True], ids=["gauss", "flat"])
@pytest.mark.parametrize("step", [4, 8])
def test_matches_vlfeat_on_imagenet(fast, step):
    if not IMAGENET.is_dir():
        pytest.skip(f"shared ImageNet sample not found at {IMAGENET}")
    from skimage import io

    files = sorted(IMAGENET.glob("*.JPEG"))[:2]
    if not files:
        pytest.skip(f"no JPEG images in {IMAGENET}")
    for f in files:
        image = (io.imread(f, as_gray=True) * 255.0).astype(np.float32)
        check_against_vlfeat(image, 8, step, fast)


@pytest.mark.parametrize("fast", [False, True], ids=["gauss", "flat"])
def test_matches_vlfeat_with_bounds_and_window(fast):
    image = crop(gray_photo("astronaut"), 150, 170)
    check_against_vlfeat(image, 6, 5, fast, bounds=[7, 3, 140, 161], window_size=1.5)


def test_constant_and_tiny_images_match_vlfeat():
    check_against_vlfeat(np.full((40, 44), 77.0, np.float32), 4, 4, False)
    check_against_vlfeat(np.full((40, 44), 77.0, np.float32), 4, 4, True)
    ramp = np.tile(np.arange(30, dtype=np.float32), (33, 1))  # one orientation only
    check_against_vlfeat(ramp, 4, 3, False)
    # Too small for a single frame: no descriptors.
    assert ours(np.zeros((20, 20), np.float32), 8, 8, False).shape == (0, 128)
    check_against_vlfeat(np.random.default_rng(0).random((20, 20), np.float32) * 255, 8, 8, False)


def test_exact_arithmetic_is_close_to_vlfeat():
    """Without VLFeat's single-precision quirks the descriptors move by ~1e-3 (Gaussian
    window; fast square root) and ~1e-2 (flat window; running-sum round-off)."""
    image = crop(gray_photo("coffee"), 160, 160)
    for fast, tol in [(False, 5e-3), (True, 5e-2)]:
        _, descrs = vlfeat_dsift(image, 8, 4, fast)
        got = ours(image, 8, 4, fast, vlfeat_rounding=False)
        assert np.abs(got - descrs).max() <= tol
        as64 = dsift(torch.from_numpy(image).double()[None, None], 8, 4, fast)[0].numpy()
        assert np.abs(as64 - descrs).max() <= tol


# --------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------
def test_frames_geometry():
    f = dsift_frames(64, 80, bin_size=8, step=8)
    # first frame: upper-left bin centre at (0, 0), centre 1.5 bins further; row-major order
    np.testing.assert_array_equal(f[0], [12.0, 12.0])
    np.testing.assert_array_equal(f[1], [12.0, 20.0])
    nfy, nfx = (63 - 24) // 8 + 1, (79 - 24) // 8 + 1
    assert f.shape == (nfy * nfx, 2) and f.dtype == np.float32
    np.testing.assert_array_equal(f[-1], [12.0 + 8 * (nfy - 1), 12.0 + 8 * (nfx - 1)])
    x = torch.rand(1, 1, 64, 80) * 255
    assert dsift(x, 8, 8).shape == (1, nfy * nfx, 128)


# --------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True], ids=["gauss", "flat"])
def test_gradcheck(fast):
    """The full Jacobian on a small image; random projections of it (``fast_mode``) on a
    larger image and on a non-square batch."""
    torch.manual_seed(0)
    x = (torch.rand(1, 1, 12, 12, dtype=torch.float64) * 255).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: dsift(t, 3, 3, fast), (x,), eps=1e-6, atol=1e-5, rtol=1e-3
    )
    x = (torch.rand(1, 1, 24, 24, dtype=torch.float64) * 255).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: dsift(t, 4, 4, fast), (x,), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True
    )
    x = (torch.rand(2, 1, 19, 23, dtype=torch.float64) * 255).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: dsift(t, 4, 3, fast), (x,), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True
    )


@pytest.mark.parametrize("fast", [False, True], ids=["gauss", "flat"])
def test_float32_gradient_matches_float64(fast):
    """The float32 path (VLFeat's arithmetic in the forward) has the exact gradient.

    (Noise is added to the photo: where an image gradient is exactly horizontal or vertical its
    angle sits on an orientation bin centre, a kink of the bilinear orientation binning, and
    float32 and float64 round to different sides of it.)"""
    rng = np.random.default_rng(0)
    noisy = crop(gray_photo("camera"), 48, 56) + rng.random((48, 56), dtype=np.float32)
    image = torch.from_numpy(noisy)[None, None]
    target = torch.rand(1, 3 * 4, 128, generator=torch.Generator().manual_seed(0)) * 60

    def grad(x: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_()
        ((dsift(x, 8, 8, fast) - target.to(x)) ** 2).sum().backward()
        return x.grad

    g32, g64 = grad(image), grad(image.double())
    assert torch.isfinite(g32).all()
    assert (g32.double() - g64).norm() <= 2e-3 * g64.norm()


def test_constant_image_has_finite_gradients():
    for fast in (False, True):
        for dtype in (torch.float32, torch.float64):
            x = torch.full((2, 1, 32, 40), 128.0, dtype=dtype, requires_grad=True)
            y = dsift(x, 4, 4, fast)
            assert torch.count_nonzero(y) == 0
            (y.sum() + ((y - 1) ** 2).sum()).backward()
            assert torch.isfinite(x.grad).all()


def test_batch_consistency():
    a = torch.from_numpy(crop(gray_photo("camera"), 97, 131))
    b = torch.from_numpy(crop(gray_photo("coffee"), 97, 131))
    for fast in (False, True):
        batch = dsift(torch.stack([a, b])[:, None], 8, 4, fast)
        single = torch.cat([dsift(a[None, None], 8, 4, fast), dsift(b[None, None], 8, 4, fast)])
        assert (batch - single).abs().max() <= TOL


@pytest.mark.parametrize(
    "bin_size,step,bounds", [(8, 8, None), (4, 8, None), (3, 3, (2, 5, 40, 33)), (4, 12, (7, 3, 44, 38))]
)
def test_banded_binning_equals_the_dense_matrices(monkeypatch, bin_size, step, bounds):
    """When the step is a multiple of the bin size the binning runs on overlapping windows
    of the padded maps (:class:`_Axis`); it equals the dense, padding-folded matrices."""
    import preimage.representations.dsift as dsift_module

    x = (torch.rand(2, 1, 47, 41, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255)
    x.requires_grad_()
    weights = torch.randn(dsift(x, bin_size, step, bounds=bounds).shape, dtype=torch.float64)
    for fast in (False, True):
        banded = dsift(x, bin_size, step, fast, bounds=bounds)
        (grad,) = torch.autograd.grad((banded * weights).sum(), x)
        axes = dsift_module._axes
        monkeypatch.setattr(dsift_module, "_axes", lambda geom, banded: axes(geom, False))
        dense = dsift(x, bin_size, step, fast, bounds=bounds)
        (dense_grad,) = torch.autograd.grad((dense * weights).sum(), x)
        monkeypatch.setattr(dsift_module, "_axes", axes)
        torch.testing.assert_close(banded, dense, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-12)


def test_groups_of_images_equal_single_images(monkeypatch):
    """Batches are processed in groups of images (here 2, 2 and 1): values and gradients do
    not depend on the grouping."""
    import preimage.representations.dsift as dsift_module

    monkeypatch.setattr(dsift_module, "_GROUP_PIXELS", 2 * 40 * 44)
    x = (torch.rand(5, 1, 40, 44, generator=torch.Generator().manual_seed(1)) * 255).requires_grad_()
    weights = torch.rand(5, 16, 128, generator=torch.Generator().manual_seed(2))
    (dsift(x, 4, 8) * weights).sum().backward()
    for i in range(5):
        xi = x[i : i + 1].detach().clone().requires_grad_()
        desc = dsift(xi, 4, 8)
        (desc * weights[i : i + 1]).sum().backward()
        torch.testing.assert_close(desc, dsift(x[i : i + 1].detach(), 4, 8), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(xi.grad, x.grad[i : i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frames", [1, 5, 20, 300])
def test_sequential_norm_sums(frames):
    """The norms are summed in order, as VLFeat does, for any number of frames."""
    d = torch.rand(3, 128, frames) ** 4 * 100
    ref = np.cumsum((d * d).numpy(), axis=1, dtype=np.float32)[:, -1:]
    np.testing.assert_array_equal(_sum_squares(d, True).numpy(), ref)


# --------------------------------------------------------------------------------------
# the representation
# --------------------------------------------------------------------------------------
def test_representation():
    rep = DSIFT(bin_size=8, step=4)
    assert rep.name == "dsift" and rep.in_channels == 1 and rep.scale == 255.0
    assert rep.geometry == Geometry(stride=4, receptive_field=32)
    assert rep.mean.tolist() == [128.0]
    photo = torch.rand(2, 3, 64, 64)
    x = rep.preprocess(photo)
    assert x.shape == (2, 1, 64, 64)
    y = rep(x)
    # offset invariance holds up to the float32 rounding of the offset
    np.testing.assert_allclose(y.numpy(), dsift(x + 128.0, 8, 4).numpy(), atol=1e-3)
    assert y.shape == (2, len(dsift_frames(64, 64, 8, 4)), 128)


def test_bad_inputs():
    rep = DSIFT()
    with pytest.raises(RepresentationError):
        rep(torch.zeros(1, 3, 32, 32))
    with pytest.raises(RepresentationError):
        rep(torch.zeros(1, 32, 32))
    with pytest.raises(RepresentationError):
        dsift(torch.zeros(2, 2, 32, 32))
    with pytest.raises(RepresentationError):
        dsift(torch.zeros(1, 1, 32, 32, dtype=torch.int64))
    with pytest.raises(RepresentationError):
        dsift(torch.zeros(1, 1, 1, 32))
    with pytest.raises(RepresentationError):
        dsift(torch.zeros(1, 1, 32, 32), bin_size=0)
    with pytest.raises(RepresentationError):
        dsift(torch.zeros(1, 1, 32, 32), bounds=(0, 0, 40, 10))
    with pytest.raises(RepresentationError):
        DSIFT(step=0)


# --------------------------------------------------------------------------------------
# the C normalization (plain arithmetic, the optimization's path; preimage.native)
# --------------------------------------------------------------------------------------
needs_native = pytest.mark.skipif(native.library(quiet=True) is None,
                                  reason=f"the C kernels cannot be built here: {native.failure()}")


@needs_native
def test_c_normalization_is_the_torch_normalization():
    """native.dsift_normalize / _backward against _normalize / _normalize_backward on strided
    histograms with a zero frame, clamped entries and entries past 255 after scaling."""
    g = torch.Generator().manual_seed(0)
    hist = (torch.rand(3, 37, 128, generator=g) * 10).transpose(1, 2)  # (N, 128, F), strided
    hist[0, :, 0] = 0
    hist[1, :6, 3] = 500.0  # clamped at 0.2 after the first normalization
    hist[:, :12, 10:20] *= 8.0  # more frames with clamped bins
    hist[2, :, 5] = 0
    hist[2, 7, 5] = 3.0  # a single bin: 512 * 1 > 255
    out = torch.empty(3, 37, 128)
    assert native.dsift_normalize(hist, out, _EPS_F, _CLAMP_F, _SQRT_TINY_F)
    ref, saved = _normalize(hist, False)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-6, atol=1e-4)
    assert out[2, 5].max() == 255.0 and torch.count_nonzero(out[0, 0]) == 0
    # a gradient with a large part along the descriptors: the normalizations' projections matter
    grad = torch.randn(3, 37, 128, generator=g) + ref.transpose(1, 2) / 20
    got = native.dsift_normalize_backward(grad, hist, _EPS_F, _CLAMP_F, _SQRT_TINY_F)
    want = _normalize_backward(grad.transpose(1, 2), saved)
    # per frame, relative to the frame's gradient (the zero frames' are huge, 1/eps)
    frame_error = (got - want).norm(dim=1) / want.norm(dim=1)
    assert frame_error.max() <= 1e-5, frame_error.max()
    # the same gradient in the fused binning's (F, N, 128) layout
    major = native.dsift_normalize_backward(grad, hist, _EPS_F, _CLAMP_F, _SQRT_TINY_F, frames_major=True)
    assert major.shape == got.shape and major.permute(2, 0, 1).is_contiguous() and torch.equal(major, got)
    assert not native.dsift_normalize(hist.double(), out.double(), _EPS_F, _CLAMP_F, _SQRT_TINY_F)


@needs_native
@pytest.mark.parametrize("fast", [False, True], ids=["gauss", "flat"])
def test_plain_float32_gradient_through_c_matches_float64(fast, monkeypatch):
    """The optimization's DSIFT (plain arithmetic, float32: the C normalization) has the float64
    gradient, and its descriptors are float64's up to float32 rounding."""
    used = []
    monkeypatch.setattr(native, "dsift_normalize_backward",
                        lambda *a, real=native.dsift_normalize_backward, **k: used.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    noisy = crop(gray_photo("camera"), 48, 56) + rng.random((48, 56), dtype=np.float32)
    image = torch.from_numpy(noisy)[None, None].expand(2, -1, -1, -1)
    target = torch.rand(1, 3 * 4, 128, generator=torch.Generator().manual_seed(0)) * 60

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.clone().requires_grad_()
        y = dsift(x, 8, 8, fast, vlfeat_rounding=False)
        ((y - target.to(x)) ** 2).sum().backward()
        return y.detach(), x.grad

    (y32, g32), (y64, g64) = run(image), run(image.double())
    assert used, "the C backward was not used"
    assert (y32.double() - y64).abs().max() <= 1e-3
    assert (g32.double() - g64).norm() <= 2e-3 * g64.norm()
