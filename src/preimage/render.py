"""Pictures of codes: HOG glyphs (like VLFeat's ``vl_hog_render``).

Each HOG cell becomes a ``glyph_size x glyph_size`` square holding one bar per orientation,
drawn along the *edge* (perpendicular to the gradient direction the bin counts) with a
brightness proportional to that orientation's energy in the cell.  The energy of orientation
``o`` is the sum of the two directed bins ``o`` and ``o + K`` (contrast-insensitive, as the
undirected part of UoCTTI HOG).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def hog_glyphs(num_orientations: int = 9, glyph_size: int = 21) -> Tensor:
    """``(K, S, S)`` anti-aliased bars, bar ``o`` perpendicular to gradient angle ``pi * o / K``."""
    S = glyph_size
    c = (S - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(S) - c, torch.arange(S) - c, indexing="ij")
    glyphs = []
    for o in range(num_orientations):
        theta = math.pi * o / num_orientations  # gradient direction (undirected)
        # distance of each pixel from the line through the centre along the edge direction
        # (perpendicular to the gradient): |<p, (cos theta, sin theta)>|
        dist = (xx * math.cos(theta) + yy * math.sin(theta)).abs()
        along = (-xx * math.sin(theta) + yy * math.cos(theta)).abs()
        bar = (1.0 - dist).clamp(0, 1) * (along <= c).float()
        glyphs.append(bar)
    return torch.stack(glyphs)


def render_hog(code: Tensor, glyph_size: int = 21, num_orientations: int = 9) -> Tensor:
    """Render a UoCTTI HOG array ``(3K + 4, h, w)`` as a gray image ``(1, h*S, w*S)`` in [0, 1]."""
    if code.dim() != 3 or code.shape[0] != 3 * num_orientations + 4:
        raise ValueError(f"expected a HOG array of shape ({3 * num_orientations + 4}, h, w), got {tuple(code.shape)}")
    K = num_orientations
    energy = (code[:K] + code[K : 2 * K]).clamp_min(0).float()  # (K, h, w)
    glyphs = hog_glyphs(K, glyph_size)  # (K, S, S)
    h, w = energy.shape[1:]
    # out[i*S + a, j*S + b] = max_o energy[o, i, j] * glyph[o, a, b]
    tiles = (energy.permute(1, 2, 0)[..., None, None] * glyphs).amax(2)  # (h, w, S, S)
    img = tiles.permute(0, 2, 1, 3).reshape(h * glyph_size, w * glyph_size)
    m = img.max()
    return (img / m if m > 0 else img).unsqueeze(0)


def draw_box(photo: Tensor, box: tuple[int, int, int, int], width: int = 1, value: float = 1.0) -> Tensor:
    """A copy of ``photo`` ``(C, H, W)`` with the rectangle ``(top, left, bottom, right)``
    (inclusive, clipped to the image) outlined in ``value`` (white): Figure 9's receptive field."""
    out = photo.clone()
    H, W = out.shape[-2:]
    t, l, b, r = max(0, box[0]), max(0, box[1]), min(H - 1, box[2]), min(W - 1, box[3])
    if t > b or l > r:
        return out
    out[:, t : min(t + width, b + 1), l : r + 1] = value
    out[:, max(b - width + 1, t) : b + 1, l : r + 1] = value
    out[:, t : b + 1, l : min(l + width, r + 1)] = value
    out[:, t : b + 1, max(r - width + 1, l) : r + 1] = value
    return out


def caption(photo: Tensor, text: str, height: int = 14) -> Tensor:
    """``photo`` ``(3, H, W)`` with a white strip below holding ``text`` in black (PIL's default font)."""
    import numpy as np
    from PIL import Image, ImageDraw

    C, H, W = photo.shape
    strip = Image.new("RGB", (W, height), "white")
    draw = ImageDraw.Draw(strip)
    while text and draw.textlength(text) > W - 2:
        text = text[:-1]
    draw.text((1, 1), text, fill="black")
    label = torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255).permute(2, 0, 1)
    return torch.cat([photo.expand(3, H, W), label], dim=1)
