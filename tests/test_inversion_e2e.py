"""End-to-end: HOG / HOGb inversion of a real photo, with the measured quality asserted."""

import pytest
import torch

from preimage import Settings, invert, make_representation, reconstruction_error

from .conftest import photo


@pytest.mark.parametrize(
    "rep,exact,bound",
    [
        # measured 2026-11-25 (CPU, seed 0, camera 128x128, C=100, 350 iterations):
        # hog with the paper's exact gradient 0.432, hog with the HOGb surrogate gradient 0.191,
        # hogb 0.135; the bounds leave a margin for platform differences.
        ("hog", True, 0.48),
        ("hog", False, 0.24),
        ("hogb", False, 0.17),
    ],
)
def test_hog_inversion_of_a_real_photo(rep, exact, bound):
    representation = make_representation(rep, exact_gradient=exact)
    img = photo("camera", 128)[None]
    r = invert(representation, img, seeds=[0], settings=Settings(C=100, jitter=1))
    assert r.error[0] < bound
    # the reported error is the paper's ||Φ(x*) - Φ(x0)|| / ||Φ(x0)|| recomputed independently
    x0 = representation.preprocess(img)
    assert reconstruction_error(representation, r.x, x0)[0] == pytest.approx(r.error[0].item(), rel=1e-4)
    # and far better than the noise it started from
    noise = torch.rand(1, 1, 128, 128) * 255 - 128
    assert reconstruction_error(representation, noise, x0)[0] > bound + 0.3


def test_surrogate_gradient_keeps_vlfeat_values_and_uses_hogb_gradient():
    x = (photo("coffee", 40)[None, :1] * 255 - 128).requires_grad_(True)
    exact, surrogate, hogb = (make_representation(n, exact_gradient=e) for n, e in
                              (("hog", True), ("hog", False), ("hogb", False)))
    a, b = exact(x), surrogate(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the value is plain HOG's
    w = torch.randn_like(a)
    (g_sur,) = torch.autograd.grad((b * w).sum(), x)
    (g_b,) = torch.autograd.grad((hogb(x) * w).sum(), x)
    torch.testing.assert_close(g_sur, g_b)  # the gradient is HOGb's
