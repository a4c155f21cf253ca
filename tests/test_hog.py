"""HOG / HOGb (preimage.representations.hog) against VLFeat 0.9.21 through cyvlfeat.

The reference is ``cyvlfeat.hog.hog`` (UoCTTI variant), which takes a float32 ``(H, W)`` or
``(H, W, C)`` array and returns ``(rows, cols, dims)``; its ``bilinear_interpolation`` flag
calls ``vl_hog_set_use_bilinear_orientation_assignments`` and changes UoCTTI too (HOGb).
Photos are VLFeat's ``0 .. 255`` intensities: the ``1e-4`` of the block normalization makes
the code scale dependent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from preimage.representations.base import RepresentationError
from preimage.representations.hog import HOG, hog, hog_shape, to_vlfeat_layout

IMAGENET = Path(__file__).parents[2] / "shared" / "images" / "imagenet-sample"
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """These tensors are small: one intra-op thread avoids OpenMP's synchronisation overhead
    (large on a busy machine), e.g. in gradcheck's thousands of tiny forward passes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vl_hog(image: np.ndarray, cell_size: int, bilinear: bool, num_orientations: int = 9) -> np.ndarray:
    """cyvlfeat's ``vl_hog`` (skipping the test when cyvlfeat is missing)."""
    cyhog = pytest.importorskip("cyvlfeat.hog", reason="cyvlfeat (VLFeat's Python binding) is not installed")
    return cyhog.hog(
        np.ascontiguousarray(image, dtype=np.float32),
        cell_size,
        variant="UoCTTI",
        n_orientations=num_orientations,
        bilinear_interpolation=bilinear,
    )


def ours(image: np.ndarray, cell_size: int, bilinear: bool, num_orientations: int = 9) -> np.ndarray:
    """:func:`hog` on an ``(H, W)`` or ``(H, W, 3)`` array, in VLFeat's layout."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    t = t[None, None] if t.dim() == 2 else t.permute(2, 0, 1)[None]
    return to_vlfeat_layout(hog(t, cell_size, num_orientations, bilinear))[0].numpy()


def photo(name: str, gray: bool) -> np.ndarray:
    """A scikit-image bundled photo as float ``0 .. 255``; ``gray``: BT.601 luma (not rounded)."""
    from skimage import data
    from skimage.color import rgb2gray

    image = getattr(data, name)()
    if image.ndim == 3 and gray:
        return rgb2gray(image) * 255.0
    return image.astype(np.float64)


def crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The centre ``size`` crop."""
    h, w = size
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    return image[top : top + h, left : left + w]


def smooth_image(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random smooth float64 images in ``0 .. 255`` (locally stable orientation assignments)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h // 4 + 2, w // 4 + 2, generator=g, dtype=torch.float64)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    return (x - x.amin()) / (x.amax() - x.amin()) * 255


def assert_matches_vlfeat(
    image: np.ndarray, cell_size: int, bilinear: bool, num_orientations: int = 9
) -> None:
    ref = vl_hog(image, cell_size, bilinear, num_orientations)
    out = ours(image, cell_size, bilinear, num_orientations)
    assert out.shape == ref.shape
    diff = float(np.abs(out - ref).max())
    assert diff <= TOLERANCE, f"max |ours - vl_hog| = {diff:.3g}"


# --- equality with VLFeat ------------------------------------------------------------------
@pytest.mark.parametrize("bilinear", [False, True], ids=["hog", "hogb"])
@pytest.mark.parametrize("cell_size", [8, 4, 6])
@pytest.mark.parametrize("size", [(160, 160), (97, 131), (64, 200)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    "name,gray",
    [
        ("astronaut", False),
        ("coffee", False),
        ("chelsea", False),
        ("astronaut", True),
        ("coffee", True),
        ("camera", True),
    ],
    ids=["astronaut-rgb", "coffee-rgb", "chelsea-rgb", "astronaut-gray", "coffee-gray", "camera"],
)
def test_matches_vlfeat_on_photos(
    name: str, gray: bool, size: tuple[int, int], cell_size: int, bilinear: bool
) -> None:
    assert_matches_vlfeat(crop(photo(name, gray), size), cell_size, bilinear)


@pytest.mark.parametrize("bilinear", [False, True], ids=["hog", "hogb"])
@pytest.mark.parametrize("num_orientations", [1, 2, 4, 6, 12])
def test_matches_vlfeat_other_orientation_counts(num_orientations: int, bilinear: bool) -> None:
    assert_matches_vlfeat(crop(photo("chelsea", False), (97, 131)), 8, bilinear, num_orientations)
    assert_matches_vlfeat(crop(photo("camera", True), (64, 72)), 5, bilinear, num_orientations)


@pytest.mark.parametrize("bilinear", [False, True], ids=["hog", "hogb"])
@pytest.mark.parametrize("size,cell_size", [((4, 4), 8), ((5, 9), 8), ((12, 5), 3), ((9, 9), 2), ((6, 7), 1)])
def test_matches_vlfeat_on_tiny_images(size: tuple[int, int], cell_size: int, bilinear: bool) -> None:
    image = np.random.default_rng(0).random(size) * 255
    assert_matches_vlfeat(image, cell_size, bilinear)


@pytest.mark.parametrize("bilinear", [False, True], ids=["hog", "hogb"])
def test_matches_vlfeat_on_ramps(bilinear: bool) -> None:
    """Uniform gradients at many angles and scales: every pixel sits at the same spot between
    two bins, so a systematic orientation error would add up instead of averaging out."""
    yy, xx = np.mgrid[0:20, 0:20].astype(np.float64)
    for degrees in np.linspace(0.0, 180.0, 97):
        for amplitude in (0.3, 7.0):
            a = np.deg2rad(degrees)
            assert_matches_vlfeat(amplitude * (np.cos(a) * xx + np.sin(a) * yy) + 50, 8, bilinear)


@pytest.mark.parametrize("bilinear", [False, True], ids=["hog", "hogb"])
def test_matches_vlfeat_on_imagenet_sample(bilinear: bool) -> None:
    if not IMAGENET.is_dir():
        pytest.skip(f"shared ImageNet sample not found at {IMAGENET}")
    from PIL import Image

    paths = sorted(p for p in IMAGENET.iterdir() if p.suffix.lower() in {".jpeg", ".jpg", ".png"})[:3]
    if not paths:
        pytest.skip(f"no images in {IMAGENET}")
    for path in paths:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
        assert_matches_vlfeat(rgb, 8, bilinear)
        assert_matches_vlfeat(crop(rgb.mean(axis=2), (203, 301)), 6, bilinear)


# --- gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("bilinear", [False, True], ids=["hog", "hogb"])
@pytest.mark.parametrize("shape,cell_size", [((1, 1, 20, 20), 4), ((2, 3, 14, 15), 5)], ids=["gray", "rgb"])
def test_gradcheck(shape: tuple[int, ...], cell_size: int, bilinear: bool) -> None:
    """Analytical vs numerical Jacobian, projected on a few random output directions (every
    input is checked; the projection keeps the number of backward passes small)."""
    x = smooth_image(*shape).requires_grad_()
    dims = 31 * int(np.prod(hog_shape(shape[2], shape[3], cell_size)))
    projection = torch.randn(dims, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def projected(t: torch.Tensor) -> torch.Tensor:
        return hog(t, cell_size, 9, bilinear).flatten(1) @ projection

    assert torch.autograd.gradcheck(projected, (x,), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("bilinear", [False, True], ids=["hog", "hogb"])
def test_gradcheck_full_jacobian(bilinear: bool) -> None:
    x = smooth_image(1, 3, 10, 11, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: hog(t, 4, 9, bilinear), (x,), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("bilinear", [False, True], ids=["hog", "hogb"])
def test_gradients_are_finite_where_the_image_is_flat(bilinear: bool) -> None:
    constant = torch.full((1, 1, 24, 24), 128.0, requires_grad=True)
    code = hog(constant, 8, 9, bilinear)
    assert code.abs().max() < 1e-6
    code.sum().backward()
    assert torch.isfinite(constant.grad).all()
    # a step edge: null gradients everywhere except along the edge
    step = torch.zeros(2, 3, 24, 24)
    step[:, :, :, 12:] = 200.0
    step.requires_grad_()
    hog(step, 8, 9, bilinear).square().sum().backward()
    assert torch.isfinite(step.grad).all() and step.grad.abs().sum() > 0


def test_gradient_is_offset_invariant_and_float32_close_to_float64() -> None:
    x = smooth_image(1, 1, 32, 32, seed=3)
    grads = []
    for dtype in (torch.float32, torch.float64):
        xi = x.to(dtype).requires_grad_()
        hog(xi, 8).square().sum().backward()
        grads.append(xi.grad.double())
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-3)


# --- batches, dtypes, shapes ---------------------------------------------------------------
@pytest.mark.parametrize("bilinear", [False, True], ids=["hog", "hogb"])
def test_batch_equals_single_images(bilinear: bool) -> None:
    images = [crop(photo(name, False), (97, 131)) for name in ("astronaut", "coffee", "chelsea")]
    batch = torch.from_numpy(np.stack(images)).float().permute(0, 3, 1, 2).contiguous()
    codes = hog(batch, 8, 9, bilinear)
    for i in range(len(images)):
        assert torch.equal(codes[i : i + 1], hog(batch[i : i + 1], 8, 9, bilinear))


@pytest.mark.parametrize("surrogate", [False, True], ids=["hogb", "surrogate"])
def test_groups_of_images_equal_single_images(monkeypatch: pytest.MonkeyPatch, surrogate: bool) -> None:
    """Batches are processed in groups of images (here 2, 2 and 1): values and gradients do
    not depend on the grouping."""
    import preimage.representations.hog as hog_module

    monkeypatch.setattr(hog_module, "_GROUP_PIXELS", 2 * 40 * 45)
    x = smooth_image(5, 1, 40, 45, seed=4).float().requires_grad_()
    rep = HOG(surrogate_gradient=True) if surrogate else HOG(bilinear_orientations=True)
    weights = torch.randn(5, 31, 5, 6, generator=torch.Generator().manual_seed(0))
    (rep(x) * weights).sum().backward()
    for i in range(5):
        xi = x[i : i + 1].detach().clone().requires_grad_()
        code = rep(xi)
        (code * weights[i : i + 1]).sum().backward()
        torch.testing.assert_close(code, rep(x[i : i + 1]).detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(xi.grad, x.grad[i : i + 1], rtol=1e-5, atol=1e-6)


def test_surrogate_shares_hog_value_and_hogb_gradient_in_float64() -> None:
    """The one-pass straight-through surrogate: HOG's value, HOGb's gradient (float64)."""
    x = smooth_image(2, 3, 30, 33, seed=5).requires_grad_()
    weights = torch.randn(2, 31, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    code = HOG(color=True, surrogate_gradient=True)(x)
    assert torch.equal(code, hog(x.detach(), 8, 9, False))
    (grad,) = torch.autograd.grad((code * weights).sum(), x)
    (reference,) = torch.autograd.grad((hog(x, 8, 9, True) * weights).sum(), x)
    torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12)


def test_dtypes() -> None:
    x = torch.from_numpy(crop(photo("camera", True), (64, 80))).float()[None, None]
    reference = hog(x, 8)
    assert hog(x.double(), 8).dtype == torch.float64
    assert torch.allclose(hog(x.double(), 8).float(), reference, atol=1e-5)
    low = hog(x.bfloat16(), 8)
    assert low.dtype == torch.bfloat16 and low.shape == reference.shape


def test_module() -> None:
    module = HOG(color=True)
    assert module.name == "hog" and HOG(bilinear_orientations=True).name == "hogb"
    assert module.in_channels == 3 and HOG().in_channels == 1
    assert module.scale == 255.0 and torch.equal(module.mean, torch.full((3,), 128.0))
    assert torch.equal(HOG().mean, torch.full((1,), 128.0))
    assert module.geometry.stride == 8 and module.geometry.receptive_field == 32
    assert HOG(cell_size=4).geometry == type(module.geometry)(stride=4, receptive_field=16)
    assert module.dimension == 31 and HOG(num_orientations=6).dimension == 22
    # the input space is 0 .. 255 minus the mean; HOG does not see the offset
    rgb = torch.from_numpy(crop(photo("astronaut", False), (64, 72))).float().permute(2, 0, 1)[None]
    code = module(module.preprocess(rgb / 255))
    assert code.shape == (1, 31, *hog_shape(64, 72))
    assert torch.allclose(code, hog(rgb), atol=1e-5)
    assert torch.equal(HOG.to_vlfeat_layout(code), code.permute(0, 2, 3, 1))
    gray = HOG(bilinear_orientations=True)
    assert torch.allclose(gray(rgb[:, :1] - 128), hog(rgb[:, :1], bilinear_orientations=True), atol=1e-5)


@pytest.mark.parametrize("height,width,cell_size", [(160, 160, 8), (97, 131, 8), (64, 200, 6), (11, 12, 4)])
def test_shape(height: int, width: int, cell_size: int) -> None:
    code = hog(torch.rand(2, 1, height, width) * 255, cell_size)
    hc, wc = (height + cell_size // 2) // cell_size, (width + cell_size // 2) // cell_size
    assert code.shape == (2, 31, hc, wc) == (2, 31, *hog_shape(height, width, cell_size))
    assert hog(torch.rand(1, 1, height, width), cell_size, num_orientations=4).shape[1] == 16
    assert to_vlfeat_layout(code).shape == (2, hc, wc, 31)


def test_errors() -> None:
    with pytest.raises(RepresentationError):
        HOG()(torch.rand(1, 3, 32, 32))  # gray representation, colour input
    with pytest.raises(RepresentationError):
        HOG(color=True)(torch.rand(1, 1, 32, 32))
    with pytest.raises(RepresentationError):
        HOG()(torch.rand(32, 32))
    with pytest.raises(RepresentationError):
        hog(torch.rand(1, 2, 32, 32))
    with pytest.raises(RepresentationError):
        hog(torch.zeros(1, 1, 32, 32, dtype=torch.int64))
    with pytest.raises(RepresentationError):
        hog(torch.rand(1, 1, 2, 32))
    with pytest.raises(RepresentationError):
        hog(torch.rand(1, 1, 3, 32), cell_size=8)  # no cell fits: (3 + 4) // 8 == 0
    with pytest.raises(RepresentationError):
        to_vlfeat_layout(torch.rand(31, 4, 4))


@pytest.mark.parametrize("name", ["hog", "hogb"])
def test_rescanning_every_pixel_gives_the_same_code(name, monkeypatch):
    """Off the CPU the orientation rescan runs on every pixel (no host synchronization, for CUDA
    graphs) and is taken where ambiguous: bit for bit the code of the numpy-found subset."""
    from preimage.representations import hog as hog_module
    from preimage.representations import make_representation

    from .conftest import photo as rgb_photo

    monkeypatch.setenv("PREIMAGE_NATIVE", "0")  # the PyTorch path (the C kernel scans every pixel)
    rep = make_representation(name)
    x = rep.preprocess(torch.stack([rgb_photo("astronaut", 64), rgb_photo("coffee", 64)]))
    x[:, :, 20:30, 20:30] = 0.0  # null gradients, left out of the rescan
    x[:, :, 40:, 40:] = x[:, :, 40:, 40:].round()  # integer images: many exact ties between bins
    subset = rep(x)
    monkeypatch.setattr(hog_module, "_rescan_every_pixel", lambda device: True)
    every = rep(x)
    assert torch.equal(every, subset)
    scan = hog_module._exact_slots  # the input has ambiguous pixels: a wrong rescan shows
    monkeypatch.setattr(hog_module, "_exact_slots", lambda gx, gy, k: tuple((t + 1) % (2 * k) for t in scan(gx, gy, k)))
    assert not torch.equal(rep(x), subset)
