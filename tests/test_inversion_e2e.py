"""End-to-end: HOG / HOGb inversion of a real photo, with the measured quality asserted."""

import pytest
import torch

from preimage import Settings, invert, make_representation, reconstruction_error

from .conftest import photo


@pytest.mark.parametrize(
    "rep,bound",
    [
        # measured 2026-11-25 (CPU, seed 0, camera 128x128, C=100, 350 iterations):
        # hog 0.432, hogb 0.135; the bounds leave a margin for platform differences.
        ("hog", 0.48),
        ("hogb", 0.17),
    ],
)
def test_hog_inversion_of_a_real_photo(rep, bound):
    representation = make_representation(rep)
    img = photo("camera", 128)[None]
    r = invert(representation, img, seeds=[0], settings=Settings(C=100, jitter=1))
    assert r.error[0] < bound
    # the reported error is the paper's ||Φ(x*) - Φ(x0)|| / ||Φ(x0)|| recomputed independently
    x0 = representation.preprocess(img)
    assert reconstruction_error(representation, r.x, x0)[0] == pytest.approx(r.error[0].item(), rel=1e-4)
    # and far better than the noise it started from
    noise = torch.rand(1, 1, 128, 128) * 255 - 128
    assert reconstruction_error(representation, noise, x0)[0] > bound + 0.3
