"""HOG glyphs point along the edges: horizontal stripes give horizontal bars."""

import torch

from preimage import make_representation
from preimage.render import render_hog


def _stripes(horizontal: bool) -> torch.Tensor:
    idx = torch.arange(64)
    band = ((idx // 8) % 2 * 255).float()
    img = band[:, None].expand(64, 64) if horizontal else band[None, :].expand(64, 64)
    return img.reshape(1, 1, 64, 64) - 128


def test_glyph_bars_follow_the_edges():
    rep = make_representation("hog")
    for horizontal in (True, False):
        g = render_hog(rep(_stripes(horizontal))[0], glyph_size=15)[0]
        inner = g[15 * 3 : 15 * 4, 15 * 3 : 15 * 4]  # one interior cell
        rows, cols = inner.sum(1), inner.sum(0)
        if horizontal:  # energy concentrated on the middle row of the glyph
            assert rows.argmax() == 7 and rows.max() > 3 * cols.max()
        else:
            assert cols.argmax() == 7 and cols.max() > 3 * rows.max()


def test_render_shape_and_range():
    code = make_representation("hog")(torch.rand(1, 1, 40, 56) * 255)[0]
    img = render_hog(code, glyph_size=9)
    assert img.shape == (1, 5 * 9, 7 * 9) and img.min() >= 0 and img.max() == 1
