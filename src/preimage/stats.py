"""Unit statistics for activation maximization (section 6): ``M``, each unit's maximum over
natural images (per channel for convolutional layers, over all spatial positions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .io import read_image
from .representations.base import Representation


def warp_crop(path: Path, input_size: int, warp: int = 256) -> Tensor:
    """Caffe's reference preprocessing geometry: warp to ``warp x warp`` (bilinear), centre crop."""
    photo = read_image(path)
    im = Image.fromarray((photo.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    warp = max(warp, input_size)
    im = im.resize((warp, warp), Image.Resampling.BILINEAR)
    off = (warp - input_size) // 2
    im = im.crop((off, off, off + input_size, off + input_size))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)


@torch.no_grad()
def unit_maxima(
    representation: Representation,
    images: Sequence[Path],
    input_size: int,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """``M`` for every unit of ``representation``: the maximum of each channel (or neuron) over
    all ``images`` and spatial positions.  Returns a ``(channels,)`` tensor."""
    best: Tensor | None = None
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        photos = torch.stack([warp_crop(p, input_size) for p in chunk])
        code = representation(representation.preprocess(photos)).float()
        m = code.flatten(2).amax(2).amax(0) if code.dim() == 4 else code.flatten(1).amax(0)
        best = m if best is None else torch.maximum(best, m)
        if on_batch is not None:
            on_batch(len(chunk))
    assert best is not None
    return best.cpu()
