"""preimage's C kernels for the CPU step (preimage.native, issue 5): the same numbers as the
PyTorch formulation they replace, on odd shapes and thread counts; built once and cached; a
missing compiler costs a fallback, never a run."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from preimage import fused, native
from preimage.defaults import PAPER
from preimage.engine import Stage, optimize
from preimage.objectives import L2Loss, jitter_crop
from preimage.representations import make_representation
from preimage.representations.base import Geometry
from preimage.representations.dsift import dsift
from preimage.representations.cnn import ModuleCut, _ToCompute, low_precision

CONSTANTS = dict(alpha=6.0, B=80.0, B_plus=160.0, V=80 / 6.5, lambda_alpha=1.0, lambda_tv=1.0, rho=0.9)

needs_library = pytest.mark.skipif(native.library(quiet=True) is None,
                                   reason=f"the C kernels cannot be built here: {native.failure()}")


@needs_library
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("shape", [(2, 3, 17, 21), (1, 3, 1, 9), (3, 1, 8, 1), (4, 3, 5, 6), (1, 3, 40, 33)])
@pytest.mark.parametrize("alpha", [6.0, 4.0])
def test_update_is_fused_update(shape: tuple[int, ...], alpha: float, threads: int) -> None:
    """Regularizers + Algorithm 1 + projection: the C kernel follows fused_update (the PyTorch
    formulation, itself tested against the eager step) for several steps, including image
    borders, one-row / one-column images and row ranges split between threads mid-image."""
    torch.manual_seed(0)
    x0 = torch.randn(shape) * 90  # some pixels beyond B+ = 160: the projection acts
    grads = [torch.randn(shape) * 1e-2 for _ in range(4)]
    constants = CONSTANTS | {"alpha": alpha}
    ref = [x0.clone(), torch.zeros(shape), torch.zeros(shape)]
    out = [x0.clone(), torch.zeros(shape), torch.zeros(shape)]
    for g in grads:
        e_ref = fused.fused_update(ref[0], g.clone(), ref[1], ref[2], lr=torch.tensor(5.0), **constants)
        e_out = native.update(out[0], g.clone(), out[1], out[2], 5.0, **constants)
        assert e_out is not None
        for a, b in zip(e_out, e_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    for a, b in zip(out, ref):  # x, G, mu
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (out[0].square().sum(1).sqrt() <= 160 * (1 + 1e-5)).all()


@needs_library
def test_update_declines_what_it_does_not_handle() -> None:
    x = torch.randn(2, 3, 8, 8)
    G, mu = torch.zeros_like(x), torch.zeros_like(x)
    assert native.update(x.double(), x.double(), G.double(), mu.double(), 1.0, **CONSTANTS) is None
    wide = torch.randn(2, 3, 8, 16)[..., ::2]  # not contiguous
    assert native.update(wide, x, G, mu, 1.0, **CONSTANTS) is None
    assert native.update(x, x[:1], G, mu, 1.0, **CONSTANTS) is None


@needs_library
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("N", [1, 3])
def test_loss_is_squared_distance(dtype: torch.dtype, layout: torch.memory_format, N: int, threads: int) -> None:
    """The L2 loss and its gradient: the values within fp32 rounding, the gradient bit for bit
    (bf16 rounded to nearest even, as torch), in the code's layout."""
    torch.manual_seed(1)
    code = torch.randn(N, 16, 9, 7).to(dtype).contiguous(memory_format=layout)
    target = torch.randn(N, 16, 9, 7).to(dtype).contiguous(memory_format=layout)
    scale = torch.rand(N) + 0.5
    ref_values, ref_grad = fused.squared_distance(code, target, scale)
    done = native.squared_distance(code, target, scale)
    assert done is not None
    values, grad = done
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=0)
    assert grad.dtype == dtype and grad.stride() == code.stride()
    assert torch.equal(grad, ref_grad)


@needs_library
def test_loss_keeps_nan_and_declines_other_inputs() -> None:
    code = torch.randn(2, 4, 3, 3).bfloat16()
    target = torch.zeros_like(code)
    code[1, 2, 1, 1] = float("nan")
    values, grad = native.squared_distance(code, target, torch.ones(2))
    assert values[0].isfinite() and values[1].isnan()  # the engine then stops with a clear error
    assert grad[1, 2, 1, 1].isnan() and grad.isnan().sum() == 1
    assert native.squared_distance(code.half(), target.half(), torch.ones(2)) is None  # fp16: not on CPUs here
    nhwc = target.contiguous(memory_format=torch.channels_last)
    assert native.squared_distance(code, nhwc, torch.ones(2)) is None  # layouts differ
    assert native.squared_distance(code[:, ::2], target[:, ::2], torch.ones(2)) is None  # not dense


@needs_library
def test_engine_runs_the_c_kernels_on_the_cpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing said: the CPU engine fuses its step with the C kernels, never with torch.compile,
    and follows the plain PyTorch trajectory."""
    def no_inductor(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.compile was started")

    monkeypatch.setattr(fused, "_run", no_inductor)
    monkeypatch.setattr(fused, "_default", None)
    monkeypatch.delenv("PREIMAGE_COMPILE", raising=False)
    rep = make_representation("hog")
    torch.manual_seed(0)
    x0 = torch.rand(2, 1, 48, 48) * 255 - 128
    with torch.no_grad():
        loss = L2Loss(rep(x0))
    stages = [Stage(4), Stage(2, lr_factor=0.1, jitter=False)]
    fast = optimize(rep, loss, (48, 48), [0, 1], PAPER, stages)
    plain = optimize(rep, loss, (48, 48), [0, 1], PAPER, stages, compile=False)
    assert fast.compiled and not plain.compiled
    for term in ("loss", "bounded_range", "tv", "total"):
        torch.testing.assert_close(fast.energy[term], plain.energy[term], rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(fast.x, plain.x, rtol=0, atol=0.5)


def _reference_crop(canvas: torch.Tensor, offsets: torch.Tensor, size: tuple[int, int], divisor: torch.Tensor | None,
                    dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """What ModuleCut.forward does to a jitter crop, in plain torch."""
    x = jitter_crop(canvas, offsets, size)
    if divisor is not None:
        x = x / divisor.view(1, -1, 1, 1)
    if channels_last:
        return _ToCompute.apply(x, dtype) if dtype != x.dtype else x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


@needs_library
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("divide", [False, True], ids=["", "std"])
@pytest.mark.parametrize("shape", [(3, 3, 9, 13), (2, 1, 5, 4), (1, 4, 1, 7), (4, 3, 1, 1)])
def test_crop_is_the_crop_then_the_conversion(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool,
                                              divide: bool, threads: int) -> None:
    """native.crop gives, bit for bit, the jitter crop divided by std and converted to the
    model's dtype and layout; native.uncrop gives, bit for bit, that chain's gradient, here
    from a gradient in its own layout and from a view into a padded tensor (what a sub-pixel
    convolution's backward hands over)."""
    N, C, H, W = shape
    T = 3
    g = torch.Generator().manual_seed(1)
    canvas = (torch.randn(N, C, H + T - 1, W + T - 1, generator=g) * 70).requires_grad_()
    offsets = torch.randint(0, T, (N, 2), generator=g)
    divisor = torch.linspace(50, 60, C) if divide else None
    out = native.crop(canvas.detach(), offsets, (H, W), divisor, dtype, channels_last)
    ref = _reference_crop(canvas, offsets, (H, W), divisor, dtype, channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.dtype == ref.dtype and out.is_contiguous(memory_format=layout)
    assert torch.equal(out, ref)
    grad = torch.randn(N, C, H, W, generator=g).to(dtype)
    padded = torch.zeros(N, C, H + 1, W + 1, dtype=dtype)[:, :, :H, :W]
    padded.copy_(grad)
    (expected,) = torch.autograd.grad(ref, canvas, grad)
    for given in (grad.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format),
                  padded, grad.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)):
        back = native.uncrop(given, offsets, tuple(canvas.shape), divisor)
        assert back.is_contiguous() and torch.equal(back, expected)


@needs_library
def test_crop_declines_what_it_does_not_handle() -> None:
    canvas = torch.randn(2, 3, 10, 10)
    offsets = torch.tensor([[0, 1], [2, 2]])
    assert native.crop_applies(canvas, offsets, (8, 8), None, torch.bfloat16)
    assert not native.crop_applies(canvas, offsets, (9, 8), None, torch.bfloat16)  # a window beyond the canvas
    assert not native.crop_applies(canvas, -offsets, (8, 8), None, torch.bfloat16)
    assert not native.crop_applies(canvas.double(), offsets, (8, 8), None, torch.float64)
    assert not native.crop_applies(canvas[:, :, ::2], offsets, (4, 8), None, torch.float32)  # not dense
    assert not native.crop_applies(canvas, offsets[:1], (8, 8), None, torch.float32)  # one offset for two
    assert not native.crop_applies(canvas, offsets, (8, 8), torch.ones(2), torch.float32)  # 2 divisors, 3 channels
    assert native.crop(canvas, offsets, (9, 8), None, torch.float32, False) is None


class _Normalized(torch.nn.Module):
    """A small bf16-able network with a first convolution of stride 2 (the sub-pixel backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 5, stride=2)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)))


@needs_library
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_module_cut_crops_in_c_as_it_would_in_torch(precision: str, layer: str) -> None:
    """ModuleCut.encode_crops with the C crop: the code and the canvas gradient are bit for bit
    those of the crop then forward, for a model that divides by std (torchvision's convention),
    in fp32 NCHW and in bf16 channels-last."""
    torch.manual_seed(0)
    model = _Normalized()
    if precision == "bf16":
        model = low_precision(model)
    cut = ModuleCut(model, layer, channels_last=precision == "bf16",
                    geometry=Geometry(stride=2, receptive_field=5)).for_optimization()
    assert cut._divide
    canvas = (torch.randn(3, 3, 34, 35) * 60).requires_grad_()
    offsets = torch.tensor([[0, 1], [1, 0], [1, 1]])
    codes, grads = [], []
    for use in (False, True):
        canvas.grad = None
        code = cut.encode_crops(canvas, offsets, (33, 34), native=use)
        code.backward(torch.linspace(-1, 1, code.numel()).view_as(code).to(code.dtype))
        codes.append(code)
        grads.append(canvas.grad)
    assert torch.equal(codes[0], codes[1]) and codes[0].stride() == codes[1].stride()
    assert torch.equal(grads[0], grads[1])


@needs_library
@pytest.mark.parametrize("name", ["hog", "dsift"])
def test_any_representation_crops_in_c_as_it_would_in_torch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The base Representation.encode_crops with the C crop: HOG's and DSIFT's codes and canvas
    gradients are bit for bit those of the per-element crop."""
    used = []
    monkeypatch.setattr(native, "uncrop", lambda *a, real=native.uncrop: used.append(1) or real(*a))
    rep = make_representation(name).for_optimization()
    canvas = (torch.rand(3, 1, 50, 51) * 255 - 128).requires_grad_()
    offsets = torch.tensor([[0, 2], [1, 0], [2, 1]])
    codes, grads = [], []
    for use in (False, True):
        canvas.grad = None
        code = rep.encode_crops(canvas, offsets, (48, 48), native=use)
        code.backward(torch.linspace(-1, 1, code.numel()).view_as(code))
        codes.append(code)
        grads.append(canvas.grad)
    assert used == [1]  # the second pass went through C
    assert torch.equal(codes[0], codes[1]) and torch.equal(grads[0], grads[1])


def _torch_then_c(phi, x: torch.Tensor, kernels: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> list:
    """``[(code, image gradient)]`` of ``phi`` on ``x``, with the C kernels off and then on
    (``PREIMAGE_NATIVE``), checking that the second pass called each of ``kernels``."""
    calls = []
    for name in kernels:
        monkeypatch.setattr(native, name, lambda *a, real=getattr(native, name), name=name: calls.append(name)
                            or real(*a))
    results = []
    for use in ("0", "1"):
        monkeypatch.setenv("PREIMAGE_NATIVE", use)
        image = x.clone().requires_grad_()
        code = phi(image)
        code.backward(torch.linspace(-1, 1, code.numel()).view_as(code))
        results.append((code.detach(), image.grad))
    assert sorted(set(calls)) == sorted(kernels)  # the second pass went through C
    return results


@needs_library
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("config", [
    dict(size=(41, 53), cell_size=8),  # plain HOG with HOGb's surrogate gradient: both codes pooled
    dict(size=(41, 53), cell_size=8, bilinear_orientations=True),
    dict(size=(30, 23), cell_size=4, surrogate_gradient=False, color=True),
    dict(size=(17, 40), cell_size=5, num_orientations=1, bilinear_orientations=True),
    dict(size=(3, 9), cell_size=3, num_orientations=4),
], ids=["hog-surrogate", "hogb", "hog-exact-colour", "hogb-k1", "3x9"])
def test_hog_pools_in_c_as_in_torch(config: dict, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """HOG's spatial pooling, orientation scan and block normalization in C (native.hog_pool,
    hog_orientations, hog_normalize and the transposes): HOG's and HOGb's codes and image
    gradients are those of the PyTorch code up to float rounding (the sums run in another
    order), for one and two pooled terms, odd sizes, thread counts that split images and rows,
    and images of one interior row or one cell."""
    from preimage.representations.hog import HOG

    torch.manual_seed(0)
    settings = dict(config)
    size = settings.pop("size")
    rep = HOG(**settings)
    x = torch.rand(3, rep.in_channels, *size) * 255
    scan = ("hog_orientations",) if rep.num_orientations > 1 or not config.get("bilinear_orientations") else ()
    kernels = ("hog_pool", "hog_pool_backward", "hog_normalize", "hog_normalize_backward", "hog_differences",
               "hog_differences_backward", *scan)
    (code, grad), (code_c, grad_c) = _torch_then_c(rep, x, kernels, monkeypatch)
    torch.testing.assert_close(code_c, code, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c, grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()))
    assert grad.abs().max() > 0


@needs_library
@pytest.mark.parametrize("threads", [1, 3], indirect=True)
@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "colour"])
@pytest.mark.parametrize("size", [(13, 17), (6, 4)], ids=["13x17", "6x4"])
def test_hog_differences_in_c_are_the_torch_arithmetic(channels: int, size: tuple[int, int], threads: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """HOG's central differences and the end of its backward pass in C (native.hog_differences,
    hog_differences_backward) do hog.py's arithmetic in its order: the same differences, the same
    channels (the first of equal ones: small integer images tie often), the same unit gradient,
    and hog._backward's image gradient bit for bit, for HOG's and HOGb's terms (HOGb's ``across``
    a tensor or a scalar), on flat regions (null gradients), odd sizes and images narrow enough that
    every column is a border case."""
    from preimage.representations import hog as hog_module

    torch.manual_seed(0)
    x = torch.randint(0, 6, (2, channels, *size)).float()
    x[0, :, 1:4] = 3.0  # flat: null gradients
    x[1] += torch.rand(x[1].shape)
    gx, gy, g2, selected = hog_module._central_differences(x)
    c_gx, c_gy, c_g2, channel = native.hog_differences(x)
    assert torch.equal(c_gx, gx) and torch.equal(c_gy, gy) and torch.equal(c_g2, g2)
    if channels == 1:
        assert channel is None and selected is None
    else:
        assert channel is not None and selected is not None
        assert torch.equal(torch.nn.functional.one_hot(channel.long(), channels).permute(0, 3, 1, 2).bool(), selected)
        colour_g2 = hog_module._central_differences(x[:, :1])[2], hog_module._central_differences(x[:, 1:2])[2]
        assert (colour_g2[0] == colour_g2[1]).sum() >= 4  # ties
    magnitude = torch.from_numpy(np.sqrt(g2.numpy()))  # correctly rounded, as the C scan's |g| (torch's: not always)
    inverse = magnitude.clamp_min(torch.finfo(torch.float32).tiny).reciprocal()  # hog._forward's unit gradient
    ux, uy = gx * inverse, gy * inverse
    assert (g2 == 0).sum() >= 2 and bool((ux[g2 == 0] == 0).all())
    for terms in ("hog", "hogb-tensor", "hogb-scalar"):
        grad0, grad1, along, across_tensor = torch.randn(4, *gx.shape)
        bilinear = terms != "hog"
        along_or_none = along if bilinear else None
        across = across_tensor if terms == "hogb-tensor" else 0.31831 if bilinear else None
        pooled = [grad0, grad1] if bilinear else [grad0]
        monkeypatch.setattr(hog_module, "_normalize_backward", lambda grad, *saved: grad)
        monkeypatch.setattr(hog_module, "_pool_backward", lambda *args: [t.clone() for t in pooled])
        results = []
        for use_c in (False, True):
            saved = (hog_module._Saved(gx, gy, along_or_none, across, channel, (), [], x, magnitude) if use_c
                     else hog_module._Saved(ux, uy, along_or_none, across, selected, (), [], x))
            out = torch.full_like(x, float("nan"))
            hog_module._backward(x, saved, 8, 9, out)
            results.append(out)
        assert torch.equal(results[1], results[0]), terms  # the unit gradient formed in C, too
        assert results[0].abs().max() > 0


def _hard_gradients(k_or: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(4, 37, 29)`` gradients on which HOG's orientation decisions are hard: random ones, small
    integers (many exact ties between two bins' scores), null ones, the angle pi (``gx < 0``,
    ``gy = 0``), vectors on every bin centre and boundary, and a few just off them."""
    torch.manual_seed(1)
    gx, gy = torch.randn(2, 4, 37, 29) * 100
    gx[1], gy[1] = torch.randint(-6, 7, (2, 37, 29)).float()
    gx[2, :5], gy[2, :5] = 0.0, 0.0
    gx[2, 5:9], gy[2, 5:9] = -torch.rand(4, 29) * 50, 0.0
    angles = torch.arange(4 * k_or, dtype=torch.float64) * math.pi / (2 * k_or)  # centres and boundaries
    angles = torch.cat([angles, angles + 1e-6, angles - 1e-6])
    radius = torch.linspace(0.5, 200, 9, dtype=torch.float64)
    on_lines = len(angles) * len(radius)  # at most 108 x 9 of the 37 x 29 entries
    gx[3].view(-1)[:on_lines] = (angles.cos()[:, None] * radius).float().view(-1)
    gy[3].view(-1)[:on_lines] = (angles.sin()[:, None] * radius).float().view(-1)
    return gx, gy


@needs_library
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("k_or", [9, 4, 2, 1])
@pytest.mark.parametrize("bilinear", [False, True], ids=["hog", "hogb"])
def test_hog_orientations_in_c_as_libvl_scans(k_or: int, bilinear: bool, threads: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """HOG's orientation assignment in C (native.hog_orientations, libvl's scan on every pixel)
    gives the PyTorch path's bins (atan2, rescanned where ambiguous) on hard gradients: the same
    directed bin (slot modulo 2K: the scan gives bin K slot 1, atan2 near +pi 2K + 1), the same ``|g|``
    bit for bit, and for HOGb the same second bin, weight and derivative factors."""
    from preimage.representations import hog as hog_module

    gx, gy = _hard_gradients(k_or)
    g2 = gx * gx + gy * gy
    monkeypatch.setenv("PREIMAGE_NATIVE", "0")
    plain = hog_module._orientations(gx.clone(), gy.clone(), g2, k_or, bilinear)
    monkeypatch.setenv("PREIMAGE_NATIVE", "1")
    calls = []
    monkeypatch.setattr(native, "hog_orientations", lambda *a, real=native.hog_orientations: calls.append(1) or real(*a))
    scanned = hog_module._orientations(gx.clone(), gy.clone(), g2, k_or, bilinear)
    assert len(calls) == (0 if bilinear and k_or == 1 else 1)  # HOGb with one bin keeps the PyTorch path

    def directed(slot: torch.Tensor) -> torch.Tensor:
        return (slot.long() - k_or - 1) % (2 * k_or)

    assert torch.equal(directed(scanned.slot), directed(plain.slot))
    assert torch.equal(scanned.magnitude, plain.magnitude)
    assert (scanned.slot != plain.slot).any() == bool(calls)  # bin K near pi: slot 2K + 1 from atan2, 1 from the scan
    if bilinear:
        assert torch.equal(directed(scanned.lower), directed(plain.lower))  # the pair's lower bin
        # libvl's weight: acos of the same cosine, to an ulp (1e-7 absolute below 1e-6)
        torch.testing.assert_close(scanned.along, plain.along, rtol=2.5e-7, atol=1e-7)
        torch.testing.assert_close(scanned.term, plain.term, rtol=2.5e-7, atol=1e-7 * float(plain.magnitude.max()))
        assert scanned.across == plain.across if k_or > 1 else torch.equal(scanned.across, plain.across)
    # the scan is what decides: swapping two bins' table entries moves pixels
    if k_or > 1:
        table = hog_module._slot_directions
        monkeypatch.setattr(hog_module, "_slot_directions", lambda k: table(k)[::-1].copy())
        hog_module._TENSORS.clear()
        try:
            moved = hog_module._orientations(gx.clone(), gy.clone(), g2, k_or, bilinear)
        finally:
            hog_module._TENSORS.clear()
        assert not torch.equal(directed(moved.slot), directed(plain.slot))


@needs_library
@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("config", [
    dict(size=(48, 48)),  # the default geometry: maps padded by continuity beyond the image
    dict(size=(37, 45), bin_size=4, step=6),  # a step that is not a multiple of the bin: dense binning
    dict(size=(50, 61), fast=True),
    dict(size=(20, 26), bin_size=3, step=2),
    dict(size=(60, 64), bounds=(12, 3, 50, 60)),  # maps inside the image: pixels outside get no gradient
    dict(size=(44, 47), bin_size=5, step=10, bounds=(2, 4, 43, 45)),  # every other centre a frame's
    dict(size=(7, 9), bin_size=1, step=1, images=17),  # one-pixel bins; 17 images: three chunks in C
    dict(size=(70, 24), bin_size=6, images=1),
], ids=["default", "dense", "flat-window", "small-bins", "bounds", "step-two-bins", "one-pixel-bins", "one-image"])
def test_dsift_maps_in_c_as_in_torch(config: dict, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """DSIFT's orientation maps, spatial binning and their transposes in C (native.dsift_pool and
    dsift_pool_backward where the bins lie on a grid, the step a multiple of the bin size;
    dsift_maps and dsift_maps_backward otherwise): the optimization's descriptors and image
    gradients are those of the PyTorch arithmetic up to float rounding, for padded maps and
    bounded ones, and images with flat regions (null gradients, whose angle is arbitrary)."""
    from preimage.representations.dsift import DSIFT

    torch.manual_seed(0)
    settings = dict(config)
    size, bounds, images = settings.pop("size"), settings.pop("bounds", None), settings.pop("images", 3)
    rep = DSIFT(**settings).for_optimization()
    x = torch.rand(images, 1, *size) * 255
    x[-1, :, 10:20, 5:30] = 77.0  # a flat patch
    phi = rep if bounds is None else lambda t: dsift(t, rep.bin_size, rep.step, bounds=bounds, vlfeat_rounding=False)
    banded = rep.step % rep.bin_size == 0
    kernels = ("dsift_pool", "dsift_pool_backward") if banded else ("dsift_maps", "dsift_maps_backward")
    (code, grad), (code_c, grad_c) = _torch_then_c(phi, x, kernels, monkeypatch)
    torch.testing.assert_close(code_c, code, rtol=1e-5, atol=1e-4)  # descriptors are 0 .. 255
    torch.testing.assert_close(grad_c, grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()))
    assert grad.abs().max() > 0
    if bounds is not None and bounds[0] > rep.bin_size:  # rows more than a bin above the first centre get nothing
        assert grad[..., : bounds[0] - rep.bin_size, :].abs().max() == 0
        assert grad[..., bounds[0] - rep.bin_size + 1, :].abs().max() > 0


@needs_library
def test_engine_crops_in_c_for_a_module_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU engine's default crops through the C crop kernel for a ModuleCut, and lands where
    the plain PyTorch step lands."""
    calls = []
    real = native.crop_kernel

    def counted(*args: object, **kwargs: object) -> torch.Tensor | None:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "crop_kernel", counted)
    torch.manual_seed(0)
    cut = ModuleCut(low_precision(_Normalized()), "conv2", channels_last=True,
                    geometry=Geometry(stride=2, receptive_field=9))
    x0 = torch.randn(2, 3, 40, 40) * 50
    with torch.no_grad():
        loss = L2Loss(cut(x0))
    stages = [Stage(4), Stage(2, lr_factor=0.1, jitter=False)]
    fast = optimize(cut, loss, (40, 40), [0, 1], PAPER, stages)
    assert len(calls) == 6
    plain = optimize(cut, loss, (40, 40), [0, 1], PAPER, stages, compile=False)
    torch.testing.assert_close(fast.energy["loss"], plain.energy["loss"], rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(fast.x, plain.x, rtol=0, atol=0.5)


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@needs_library
def test_built_once_per_machine_into_the_cache(tmp_path: Path) -> None:
    """The first process builds the library into $PREIMAGE_CACHE (no temporary file left); the
    next loads it without building."""
    probe = "from preimage import native; print(native.library() is not None)"
    first = _python(probe, {"PREIMAGE_CACHE": str(tmp_path)})
    assert first.stdout.strip() == "True", first.stderr
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].name.startswith("native-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    again = _python(probe, {"PREIMAGE_CACHE": str(tmp_path), "CC": "/nonexistent/cc-is-not-needed"})
    assert again.stdout.strip() == "True", again.stderr
    assert built[0].stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [built[0].name]


def test_without_a_compiler_the_engine_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No C compiler: the default quietly stays plain PyTorch; asking for the fused step warns
    once and names the reason."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.setattr(fused, "_default", None)
    monkeypatch.delenv("PREIMAGE_COMPILE", raising=False)
    monkeypatch.setenv("PREIMAGE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.wanted(None, "cpu") is False  # quiet
    with pytest.warns(RuntimeWarning, match=r"C kernels are unavailable, using torch.compile's: .*no-such-cc"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert native.library() is None
    assert list(tmp_path.iterdir()) == []


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'native.c:1: error: this compiler is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv("PREIMAGE_CACHE", str(cache))
    monkeypatch.setenv("CC", str(broken))
    assert native.library(quiet=True) is None
    assert "this compiler is broken" in (native.failure() or "")
    assert list(cache.iterdir()) == []


@needs_library
def test_an_unwritable_cache_builds_in_the_temporary_directory(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    (tmp_path / "tmp").mkdir()
    probe = "from preimage import native; lib = native.library(); print(lib is not None, lib._name)"
    done = _python(probe, {"PREIMAGE_CACHE": str(blocked / "cache"), "TMPDIR": str(tmp_path / "tmp")})
    ok, name = done.stdout.split()
    assert ok == "True", done.stderr
    assert Path(name).parent == tmp_path / "tmp" / f"preimage-{os.getuid()}"


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")
def test_kernels_stay_in_bounds_under_sanitizers(tmp_path: Path) -> None:
    """The C kernels built with AddressSanitizer and UndefinedBehaviorSanitizer, driven over odd
    shapes (1 x 1, one row, one column) and more threads than rows: no access outside the
    buffers, no undefined arithmetic."""
    harness = Path(__file__).parent / "data" / "native_harness.c"
    binary = tmp_path / "harness"
    cc = os.environ.get("CC") or "cc"
    flags = ["-O1", "-g", "-fopenmp", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-std=c11"]
    built = subprocess.run([cc, *flags, "-o", str(binary), str(harness), str(native.SOURCE), "-lm"],
                           capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "sanitize" in built.stderr:
        pytest.skip(f"{cc} cannot build with sanitizers here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"})
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr[-2000:]
